"""Version chains (docs/trust.md, "Version chains"): which chain is chosen, and which version a source is.

The promises: the shortest chain of rules, ties going to the first declared rule; a source's
version recognised by its ``signature`` patterns *and* its ``absent`` patterns.
"""

from __future__ import annotations

import pytest
import torch

import statebridge as sb
from statebridge.cli import main
from statebridge.plugins import installed
from statebridge.trust.versions import Rule, Version, VersionGraph

STATE = {"a.w": torch.ones(2), "b.w": torch.zeros(2)}


def rule(source: str, target: str, tag: str) -> Rule:
    """A rule that appends ``tag`` to the ``a.*`` key, so the output's name spells the chain taken."""
    steps = [{"rename": {"pattern": r"re:^(a\..*)$", "to": rf"\1.{tag}"}}]
    return Rule.model_validate({"from": source, "to": target, "steps": steps})


def names(graph: VersionGraph, start: str, goal: str) -> list[str]:
    """The key the chosen chain makes of ``a.w`` (``b.w`` passes through)."""
    return [k for k in sb.plan(STATE, graph.pipeline(start, goal, installed().transforms)).outputs if k != "b.w"]


def test_the_shortest_chain_wins_whatever_the_order_rules_are_declared_in():
    rules = [rule("v1", "x", "x"), rule("x", "y", "y"), rule("y", "v3", "long"), rule("v1", "v3", "short")]
    graph = VersionGraph({}, rules)
    assert graph.chain("v1", "v3") == [rules[3]]
    assert names(graph, "v1", "v3") == ["a.w.short"]


@pytest.mark.parametrize("first", ["via_p", "via_q"])
def test_ties_go_to_the_first_declared_rule(first):
    via_p = [rule("v1", "p", "p"), rule("p", "v3", "from_p")]
    via_q = [rule("v1", "q", "q"), rule("q", "v3", "from_q")]
    rules = via_p + via_q if first == "via_p" else via_q + via_p
    graph = VersionGraph({}, rules)
    assert names(graph, "v1", "v3") == (["a.w.p.from_p"] if first == "via_p" else ["a.w.q.from_q"])
    # the same when only the first hop is declared earlier and the last hops in the other order
    interleaved = [rules[0], rules[2], rules[3], rules[1]]
    assert names(VersionGraph({}, interleaved), "v1", "v3") == (["a.w.p.from_p"] if first == "via_p" else ["a.w.q.from_q"])


def test_ties_that_meet_before_the_goal_keep_the_first_declared_way_in():
    rules = [rule("v1", "p", "p"), rule("v1", "q", "q"), rule("q", "m", "m"), rule("p", "m", "m"), rule("m", "v3", "v3")]
    assert names(VersionGraph({}, rules), "v1", "v3") == ["a.w.p.m.v3"]


def test_two_rules_between_the_same_versions_take_the_first():
    graph = VersionGraph({}, [rule("v1", "v2", "first"), rule("v1", "v2", "second")])
    assert names(graph, "v1", "v2") == ["a.w.first"]


def test_a_chain_is_one_pipeline_of_every_hop_in_order():
    rules = [rule("v2", "v3", "three"), rule("v1", "v2", "two")]
    assert names(VersionGraph({}, rules), "v1", "v3") == ["a.w.two.three"]
    assert VersionGraph({}, rules).chain("v1", "v1") == []


VERSIONS = {
    "old": Version(signature=["a.**"], absent=["b.**"]),
    "new": Version(signature=["a.**", "b.**"]),
    "empty": Version(),
}


def metas(*keys: str) -> dict[str, sb.TensorMeta]:
    return {k: sb.TensorMeta((2,), "float32") for k in keys}


def test_absent_patterns_rule_a_version_out():
    graph = VersionGraph(VERSIONS, [])
    assert graph.detect(metas("a.w", "b.w")) == "new"  # "old" has a.w but must not have b.w
    assert graph.detect(metas("a.w", "a.v")) == "old"
    with pytest.raises(sb.PlanError, match="matches no version's signature"):
        graph.detect(metas("c.w"))


def test_a_version_without_a_signature_is_never_detected():
    graph = VersionGraph({"empty": Version(), "any": Version(signature=["**"])}, [])
    assert graph.detect(metas("x")) == "any"


def test_two_matching_signatures_are_an_error_naming_both():
    graph = VersionGraph({"one": Version(signature=["a.*"]), "two": Version(signature=["*.w"])}, [])
    with pytest.raises(sb.PlanError, match="matches the signatures of one, two; name one with --from"):
        graph.detect(metas("a.w"))


CONFIG = """
source: {source}
target: out.safetensors
versions:
  old: {{signature: ["a.**"], absent: ["b.**"]}}
  new: {{signature: ["a.**", "b.**"]}}
  final: {{}}
rules:
  - {{from: old, to: final, steps: [{{rename: {{mapping: {{a.w: from_old}}}}}}]}}
  - {{from: new, to: final, steps: [{{rename: {{mapping: {{a.w: from_new}}}}}}]}}
"""


def test_the_command_line_detects_the_source_version_with_absent_patterns(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(STATE, tmp_path / "both.safetensors")
    save_file({"a.w": torch.ones(2)}, tmp_path / "only_a.safetensors")
    for source, expected in (("both.safetensors", "from_new"), ("only_a.safetensors", "from_old")):
        config = tmp_path / f"{source}.yaml"
        config.write_text(CONFIG.format(source=source))
        assert main(["run", str(config), "--to", "final", "--no-progress", "--target", str(tmp_path / f"{source}.out.safetensors")]) == 0
        assert expected in load_file(tmp_path / f"{source}.out.safetensors")
    # --from overrides detection
    config = tmp_path / "both.safetensors.yaml"
    assert main(["run", str(config), "--from", "old", "--to", "final", "--no-progress", "--target", str(tmp_path / "forced.safetensors")]) == 0
    assert "from_old" in load_file(tmp_path / "forced.safetensors")
