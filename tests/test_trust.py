"""Checks on the plan before a byte is written: coverage, target specs, collisions, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import statebridge as sb
from statebridge import CollisionError, ConfigError, PlanError
from statebridge.cli import main
from statebridge.trust.coverage import Requirements
from statebridge.tensors.provenance import FINGERPRINT_KEY, LINEAGE_KEY
from statebridge.testing import LlamaShape, llama_state_dict

QKV = dict(
    inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
    output="model.layers.*.self_attn.qkv_proj.weight",
)


def test_counts_of_mapped_unmapped_new_dropped(llama_file):
    class Bias(sb.Transform):
        name = "bias"

        def plan(self, metas):
            meta = sb.TensorMeta((4,), torch.float32)
            return [sb.Group(inputs=(), outputs={"extra.bias": meta}, compute=lambda t: {"extra.bias": torch.zeros(4)}, ops=("init",))]

    plan = sb.plan(llama_file, [sb.Concat(**QKV), sb.Drop(keys=["lm_head.weight"]), Bias()])
    assert plan.counts() == {
        "source tensors": 21, "target tensors": 17, "groups": 17, "mapped": 6, "unmapped": 14, "dropped": 1, "new": 1,
    }
    assert plan.new == ["extra.bias"] and plan.dropped == ["lm_head.weight"]


def test_coverage_requirement_lists_untouched_keys_by_layer_pattern(llama_file):
    with pytest.raises(PlanError) as e:
        sb.plan(llama_file, [sb.Concat(**QKV)], require={"coverage": 1.0})
    message = str(e.value)
    assert "coverage 0.286 < required 1.0: 15 source tensors pass through untouched" in message
    assert "model.layers.{0..1}.mlp.up_proj.weight" in message
    sb.plan(llama_file, [sb.Concat(**QKV), sb.Identity(keys=["**"])], require={"coverage": 1.0})


def test_target_spec_missing_extra_shape_dtype(llama_file, tmp_path):
    target = {k: v for k, v in llama_state_dict(LlamaShape(layers=3)).items() if "qkv" not in k}
    save_file({k: v.half() if "norm" in k else v for k, v in target.items()}, tmp_path / "spec.safetensors")
    with pytest.raises(PlanError) as e:
        sb.plan(llama_file, [sb.Concat(**QKV)], expect=tmp_path / "spec.safetensors", require={"no_missing": True, "no_extra": True})
    message = str(e.value)
    assert "error (no_missing): 15 keys of the target spec are not produced: " in message
    assert "error (no_extra): 2 produced keys are not in the target spec: model.layers.{0..1}.self_attn.qkv_proj.weight" in message
    assert "error (match_dtypes): 5 tensors differ in dtype from the target spec: " in message
    assert "'model.layers.0.input_layernorm.weight': float32[64] here, float16[64] expected" in message
    plan = sb.plan(llama_file, [sb.Concat(**QKV)], expect=list(target), require={"no_extra": False})
    assert {f.check for f in plan.findings if f.level == "warning"} >= {"no_missing", "no_extra"}


class _Suggests:
    """A plugin answering the suggest_keys hook with the key spelled as the spec spells it, and what it was asked."""

    def __init__(self, fails: bool = False) -> None:
        self.fails, self.asked = fails, []

    @sb.hookimpl
    def suggest_keys(self, unmatched, candidates):
        self.asked.append((dict(unmatched), dict(candidates)))
        if self.fails:
            raise RuntimeError("a broken plugin")
        return {k: [c for c in candidates if k.replace("_proj", "") == c.replace("_proj", "")] for k in unmatched}


@pytest.fixture
def core_only(monkeypatch):
    """The plugins of this process: the core's alone (no installed plugin answers suggest_keys), reloaded after."""
    from statebridge.plugins import installed, reset_plugins

    monkeypatch.setenv("STATEBRIDGE_LOAD_PLUGINS", "")
    reset_plugins()
    yield installed()
    monkeypatch.delenv("STATEBRIDGE_LOAD_PLUGINS")
    reset_plugins()


def test_a_missed_target_asks_the_suggest_keys_hook_and_errors_alone_without_it(llama_file, core_only):
    """``require`` against ``expect``: the spec's keys nothing makes are offered for the keys made that it lacks."""
    spec = [k.replace("q_proj", "q") for k in llama_state_dict(LlamaShape(layers=2))]
    require = {"no_missing": True, "no_extra": True}
    with pytest.raises(PlanError) as plain:
        sb.plan(llama_file, None, expect=spec, require=require)
    assert "did you mean" not in str(plain.value)
    suggests = _Suggests()
    core_only.add(suggests, "suggests")
    with pytest.raises(PlanError) as e:
        sb.plan(llama_file, None, expect=spec, require=require)
    (unmatched, candidates), = suggests.asked  # once: both findings share one question
    assert set(unmatched) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    assert set(candidates) == {f"model.layers.{i}.self_attn.q.weight" for i in range(2)} and unmatched[next(iter(unmatched))].shape == (64, 64)
    assert str(e.value) == str(plain.value).replace(
        "model.layers.{0..1}.self_attn.q.weight\n",
        "model.layers.{0..1}.self_attn.q.weight; did you mean: 'model.layers.0.self_attn.q_proj.weight' -> "
        "'model.layers.0.self_attn.q.weight'; 'model.layers.1.self_attn.q_proj.weight' -> 'model.layers.1.self_attn.q.weight'?\n")


def test_a_suggest_keys_plugin_that_fails_leaves_the_error_as_it_was(llama_file, core_only):
    spec = [k.replace("q_proj", "q") for k in llama_state_dict(LlamaShape(layers=2))]
    with pytest.raises(PlanError) as plain:
        sb.plan(llama_file, None, expect=spec, require={"no_missing": True})
    core_only.add(_Suggests(fails=True), "fails")
    with pytest.raises(PlanError) as e:
        sb.plan(llama_file, None, expect=spec, require={"no_missing": True})
    assert str(e.value) == str(plain.value)


def test_a_strict_load_into_names_the_nearest_module_keys_through_the_hook(llama_sd, core_only):
    holder = torch.nn.Module()
    holder.register_parameter("w_proj", torch.nn.Parameter(torch.zeros(256, 64)))
    with pytest.raises(PlanError) as plain:
        sb.load_into(holder, {"w": llama_sd["lm_head.weight"]})
    assert "did you mean" not in str(plain.value)
    core_only.add(_Suggests(), "suggests")
    with pytest.raises(PlanError) as e:
        sb.load_into(holder, {"w": llama_sd["lm_head.weight"]})
    assert str(e.value) == str(plain.value) + "; did you mean: 'w' -> 'w_proj'?"


def test_target_spec_from_a_module_checks_shapes(llama_sd):
    holder = torch.nn.Module()
    holder.register_parameter("w", torch.nn.Parameter(torch.zeros(300, 64)))
    with pytest.raises(PlanError, match=r"1 tensors differ in shape from the target spec: w \(e.g. 'w': float32\[256, 64\] here, float32\[300, 64\] expected\)"):
        sb.plan({"weight": llama_sd["lm_head.weight"]}, [sb.Rename(mapping={"weight": "w"})], expect=holder)


def test_no_missing_needs_a_spec(llama_file):
    with pytest.raises(ConfigError, match="need a target spec"):
        sb.plan(llama_file, None, require={"no_missing": True})


def test_require_on_the_command_line(tmp_path, llama_file, capsys):
    (tmp_path / "c.yaml").write_text(f"source: {llama_file}\ntarget: out.safetensors\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--require", "coverage=0.5"]) == 2
    assert "coverage 0.000 < required 0.5" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    assert Requirements.parse("coverage=1,no_missing") == Requirements(coverage=1.0, no_missing=True)
    with pytest.raises(ConfigError, match="--require 'coverage=2'"):
        Requirements.parse("coverage=2")


def test_collision_warn_keeps_the_last_and_says_so(tmp_path):
    state = {"a.weight": torch.zeros(2), "b.weight": torch.ones(2), "c": torch.full((2,), 7.0)}
    steps = [sb.Rename(mapping={"a.weight": "w", "b.weight": "w"})]
    with pytest.raises(CollisionError):
        sb.plan(state, steps)
    plan = sb.plan(state, steps, on_collision="warn")
    assert [f.level for f in plan.findings if f.check == "core.collision"] == ["warning"]
    assert "kept the last (on_collision: warn)" in plan.collisions[0]
    assert plan.overwritten == ["a.weight"] and plan.dropped == []
    report = sb.run(state, steps, tmp_path / "out.safetensors", on_collision="warn")
    assert report.files
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.get_tensor("w").tolist() == [1, 1]
    over = sb.plan(state, [sb.Rename(mapping={"a.weight": "c"})], on_collision="warn")
    assert "it was replaced" in over.collisions[0] and over.overwritten == ["c"]


def test_fingerprint_is_stable_and_order_sensitive_where_order_matters():
    a = sb.Pipeline([sb.Rename(mapping={"x": "y", "p": "q"}), sb.Cast(dtype="bf16")])
    b = sb.Pipeline([sb.Rename(mapping={"p": "q", "x": "y"}), sb.Cast(dtype="bfloat16")])
    c = sb.Pipeline([sb.Cast(dtype="bf16"), sb.Rename(mapping={"x": "y", "p": "q"})])
    d = sb.Pipeline([sb.Concat(inputs=["k", "q"], output="kq")])
    e = sb.Pipeline([sb.Concat(inputs=["q", "k"], output="kq")])
    from statebridge.planning.fingerprint import fingerprint

    assert fingerprint(a, {}) == fingerprint(b, {})  # mapping order and dtype spelling do not matter
    assert fingerprint(a, {}) != fingerprint(c, {})  # step order does
    assert fingerprint(d, {}) != fingerprint(e, {})  # input order does
    assert fingerprint(a, {}) != fingerprint(a, {"rename": "other-plugin 1.0"})  # so does the plugin providing a step
    assert len(fingerprint(a, {})) == 64


def test_fingerprint_is_the_same_from_any_config_location(tmp_path, llama_file):
    for folder in ("one", "two/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "c.yaml").write_text(f"source: {llama_file}\nsteps:\n  - cast: {{dtype: fp16}}\n")
    prints = [sb.plan(llama_file, sb.load_config(tmp_path / f / "c.yaml").pipeline()).fingerprint for f in ("one", "two/deeper")]
    assert prints[0] == prints[1]


def test_fingerprint_and_lineage_are_stored_and_shown(tmp_path, llama_file, capsys):
    report = sb.run(llama_file, [sb.Concat(**QKV)], tmp_path / "out", shard_size=60_000)
    shard = sorted((tmp_path / "out").glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as f:
        metadata = f.metadata()
    assert metadata[FINGERPRINT_KEY] == report.plan.fingerprint
    lineage = json.loads(metadata[LINEAGE_KEY])
    assert lineage["model.layers.0.self_attn.qkv_proj.weight"] == {
        "from": [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"],
        "ops": ["concat(dim=0)"],
    }
    assert main(["inspect", str(tmp_path / "out"), "--lineage"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {report.plan.fingerprint}" in out
    assert "model.layers.1.self_attn.qkv_proj.weight <- model.layers.1.self_attn.q_proj.weight" in out


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".gguf", ""])
def test_two_runs_are_byte_identical_in_every_format(tmp_path, llama_file, suffix):
    import hashlib

    steps = [sb.Concat(**QKV), sb.Cast(dtype="fp16")]

    def digest(path):
        if not path.is_dir():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in sorted(path.iterdir()))).hexdigest()

    sb.run(llama_file, steps, tmp_path / f"a{suffix}", shard_size=70_000)
    sb.run(llama_file, steps, tmp_path / f"b{suffix}", shard_size=70_000)
    assert digest(tmp_path / f"a{suffix}") == digest(tmp_path / f"b{suffix}")
