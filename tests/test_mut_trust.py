"""Version chains, requirements and lineage, checked where mutation testing found the suite blind.

The errors of ``trust/versions.py`` and ``trust/coverage.py`` are one line each that a user acts
on (which versions exist, which rules there are, which field is wrong): they are compared
whole.  The lineage stored in every output is compared byte for byte (docs/testing.md, Score).
"""

from __future__ import annotations

import datetime
import hashlib
import json

import pytest
import torch

import statebridge as sb
from statebridge.errors import ConfigError, PlanError
from statebridge._version import __version__
from statebridge.planning.fingerprint import canonical, fingerprint, lineage_json
from statebridge.plugins import installed
from statebridge.tensors.meta import TensorMeta
from statebridge.trust.coverage import Requirements
from statebridge.trust.versions import Rule, Version, VersionGraph

STEPS = [{"rename": {"pattern": "a", "to": "b"}}]


def rule(source: str, target: str, steps: list | None = None) -> Rule:
    return Rule.model_validate({"from": source, "to": target, "steps": steps or STEPS})


def message(call) -> str:
    with pytest.raises((ConfigError, PlanError)) as caught:
        call()
    return str(caught.value)


def test_a_rule_naming_an_undeclared_version_lists_the_declared_ones():
    versions = {"v1": Version(), "v2": Version()}
    assert message(lambda: VersionGraph(versions, [rule("v1", "v2"), rule("v2", "v3")])) == (
        "rules[1]: version 'v3' is not declared under versions: (v1, v2)"
    )


def test_an_unknown_version_lists_the_known_ones():
    graph = VersionGraph({}, [rule("v1", "v2"), rule("v2", "v3")])
    assert message(lambda: graph.chain("v1", "v9")) == "unknown version 'v9'; known versions: v1, v2, v3"


def test_a_missing_chain_says_what_is_reachable_and_lists_the_rules():
    graph = VersionGraph({}, [rule("v1", "v2"), rule("v2", "v3"), rule("v1", "v4"), rule("v5", "v1")])
    assert message(lambda: graph.chain("v1", "v5")) == (
        "no chain of rules from 'v1' to 'v5': from 'v1' the rules reach v2, v3, v4; "
        "add a rule into 'v5' (rules: v1->v2, v2->v3, v1->v4, v5->v1)"
    )
    assert message(lambda: graph.chain("v3", "v1")) == (
        "no chain of rules from 'v3' to 'v1': from 'v3' the rules reach nothing; "
        "add a rule into 'v1' (rules: v1->v2, v2->v3, v1->v4, v5->v1)"
    )


def test_a_chain_between_versions_without_rules_says_there_are_none():
    graph = VersionGraph({"v1": Version(), "v2": Version()}, [])
    assert message(lambda: graph.chain("v1", "v2")) == (
        "no chain of rules from 'v1' to 'v2': from 'v1' the rules reach nothing; add a rule into 'v2' (rules: none)"
    )


def test_a_source_matching_no_signature_lists_the_versions():
    graph = VersionGraph({"v1": Version(signature=["x.*"]), "v2": Version(signature=["y.*"])}, [])
    metas = {"z.w": TensorMeta((2,), torch.float32)}
    assert message(lambda: graph.detect(metas)) == (
        "the source matches no version's signature; name it with --from (v1, v2)"
    )


def test_an_error_in_a_rule_step_names_the_rule():
    graph = VersionGraph({}, [rule("v1", "v2"), rule("v2", "v3", [{"rename": {"pattern": "a", "to": "b", "bogus": 1}}])])
    assert message(lambda: graph.pipeline("v1", "v3", installed().transforms)) == (
        "rule v2->v3: steps[0]: rename.bogus: Extra inputs are not permitted"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("coverage=2", "--require 'coverage=2': coverage: Input should be less than or equal to 1"),
        ("covrage=1", "--require 'covrage=1': covrage: Extra inputs are not permitted"),
    ],
)
def test_a_bad_require_names_the_flag_and_the_field(text, expected):
    assert message(lambda: Requirements.parse(text)) == expected


def test_the_lineage_is_compact_json_of_the_changed_tensors_only():
    """Stored in every output's metadata: same plan, same bytes; unchanged tensors are not listed."""
    state = {"a.w": torch.ones(2), "b.w": torch.ones(2), "ü.w": torch.ones(2)}
    plan = sb.plan(state, [sb.Rename(pattern="a.w", to="c.w"), sb.Rename(pattern="ü.w", to="é.w")])
    text = lineage_json(plan.lineage)
    assert text == '{"c.w":{"from":["a.w"],"ops":["rename"]},"é.w":{"from":["ü.w"],"ops":["rename"]}}'
    assert json.loads(text).keys() == {"c.w", "é.w"}


class Stamp(sb.Transform):
    """A transform of the caller's own, with a parameter JSON has no type for (a date) and one named ``steps``."""

    name = "stamp_for_test"
    version = "3"

    class Params(sb.Params):
        pattern: str
        when: datetime.date
        steps: int = 2  # a parameter of that name, not nested steps

    def plan(self, metas):
        return []


def test_the_canonical_form_names_each_step_its_version_provider_and_json_parameters():
    """A step of the caller's own is named by its module; parameters are in their JSON form; nested steps nest."""
    stamp = Stamp(pattern="a", when=datetime.date(2026, 12, 2))
    pipeline = sb.Sequential(steps=[stamp, sb.Rename(pattern="a", to="b")])
    assert canonical(pipeline, {"rename": "core 1.0"}) == {
        "transform": "sequential",
        "version": "1",
        "plugin": "statebridge.transforms.composite",
        "params": {
            "steps": [
                {"transform": "stamp_for_test", "version": "3", "plugin": __name__, "params": {"pattern": "a", "when": "2026-12-02", "steps": 2}},
                {"transform": "rename", "version": "1", "plugin": "core 1.0", "params": {"mapping": None, "pattern": "a", "to": "b", "strict": True}},
            ]
        },
    }


def test_the_fingerprint_is_the_sha256_of_the_canonical_document():
    """The stored fingerprint's exact form: outputs written by earlier runs stay comparable."""
    pipeline = sb.Sequential(steps=[Stamp(pattern="a", when=datetime.date(2026, 12, 2)), sb.Rename(pattern="é", to="b")])
    providers = {"rename": "core 1.0"}
    document = {"statebridge": __version__, "pipeline": canonical(pipeline, providers)}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert fingerprint(pipeline, providers) == hashlib.sha256(text.encode()).hexdigest()
    edits = {"hidden_size": 8}
    with_edits = json.dumps({**document, "config_edits": edits}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert fingerprint(pipeline, providers, edits) == hashlib.sha256(with_edits.encode()).hexdigest()


def test_a_parameter_holding_a_lone_surrogate_still_has_a_fingerprint():
    """The step refuses such a key with its own message later; the fingerprint must not crash first."""
    pipeline = sb.Sequential(steps=[sb.Rename(pattern="a\udc80", to="b")])
    document = {"statebridge": __version__, "pipeline": canonical(pipeline, {})}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert fingerprint(pipeline, {}) == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


FOUR = {"a.w": torch.ones(2), "b.w": torch.ones(2), "c.w": torch.ones(2), "d.w": torch.ones(2)}


def test_dropped_tensors_count_as_handled_for_coverage():
    plan = sb.plan(FOUR, [sb.Drop(keys=["a.w", "b.w"])], require={"coverage": 0.5})
    assert [f.level for f in plan.findings] == ["info"]
    plan = sb.plan(FOUR, [sb.Drop(keys=["a.w"]), sb.Rename(pattern="b.w", to="e.w")], require={"coverage": 0.5})
    assert [f.level for f in plan.findings] == ["info"]


def test_a_coverage_below_the_requirement_is_one_error_naming_the_check_and_the_keys():
    with pytest.raises(PlanError) as caught:
        sb.plan(FOUR, [sb.Drop(keys=["a.w"])], require={"coverage": 0.5})
    assert str(caught.value) == (
        "the plan failed its checks:\n"
        "  error (coverage): coverage 0.250 < required 0.5: 3 source tensors pass through untouched: b.w, c.w, d.w"
    )


def test_no_missing_without_a_spec_says_what_spec_it_needs():
    assert message(lambda: sb.plan(FOUR, None, require={"no_missing": True})) == (
        "no_missing and no_extra need a target spec: expect: a checkpoint, a module or a key list"
    )
