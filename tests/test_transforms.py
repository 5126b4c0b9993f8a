"""Every built-in transform: its plan (from metadata alone), its output, its inverse."""

from __future__ import annotations

import pytest
import torch

import statebridge as sb
from statebridge import CollisionError, ConfigError, NotInvertibleError, PlanError, UnknownTransformError
from statebridge.readers import DictSource


def apply(state: dict[str, torch.Tensor], steps) -> dict[str, torch.Tensor]:
    """Plan against the state's metadata, then execute every group (no file involved)."""
    plan = sb.plan(DictSource(state), steps)
    out: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        out.update(group.compute({k: state[k] for k in group.inputs}))
    assert list(out) == list(plan.outputs)
    for key, meta in plan.outputs.items():
        assert sb.TensorMeta.of(out[key]) == meta
    return out


def assert_round_trip(state, steps):
    pipeline = sb.Pipeline(steps)
    forward = apply(state, pipeline)
    inverse = pipeline.inverse(DictSource(state).metas())
    back = apply(forward, inverse)
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key


def test_rename_mapping_glob_and_regex(llama_sd):
    out = apply(llama_sd, [sb.Rename(mapping={"lm_head.weight": "output.weight"})])
    assert "output.weight" in out and "lm_head.weight" not in out
    out = apply(llama_sd, [sb.Rename(pattern="model.layers.*.self_attn.**", to="blocks.*.attn.**")])
    assert torch.equal(out["blocks.1.attn.q_proj.weight"], llama_sd["model.layers.1.self_attn.q_proj.weight"])
    out = apply(llama_sd, [sb.Rename(pattern=r"re:^model\.", to="")])
    assert "layers.0.mlp.up_proj.weight" in out and "lm_head.weight" in out


def test_rename_keeps_order_and_is_a_pure_rename_group(llama_sd):
    plan = sb.plan(DictSource(llama_sd), [sb.Rename(pattern="model.**", to="m.**")])
    assert [k.replace("m.", "model.", 1) if k.startswith("m.") else k for k in plan.outputs] == list(llama_sd)
    assert all(g.pieces for g in plan.groups)


def test_rename_round_trip(llama_sd):
    assert_round_trip(llama_sd, [sb.Rename(pattern="model.layers.*.**", to="h.*.**"), sb.Rename(mapping={"lm_head.weight": "out"})])


def test_missing_source_key_names_it_and_suggests():
    with pytest.raises(PlanError) as e:
        sb.plan(DictSource({"lm_head.weight": torch.zeros(2)}), [sb.Rename(mapping={"lm_haed.weight": "x"})])
    message = str(e.value)
    assert "steps[0] (rename)" in message and "'lm_haed.weight'" in message and "did you mean 'lm_head.weight'" in message


def test_pattern_that_matches_nothing_is_an_error_unless_not_strict(llama_sd):
    with pytest.raises(PlanError, match="matches no key"):
        sb.plan(DictSource(llama_sd), [sb.Cast(pattern="encoder.*", dtype="fp16", strict=True)])
    sb.plan(DictSource(llama_sd), [sb.Rename(pattern="encoder.**", to="x.**", strict=False)])


def test_collision_between_groups_names_both_sources():
    state = {"a.weight": torch.zeros(2), "b.weight": torch.ones(2)}
    with pytest.raises(CollisionError) as e:
        sb.plan(DictSource(state), [sb.Rename(mapping={"a.weight": "w", "b.weight": "w"})])
    assert "'w'" in str(e.value) and "a.weight" in str(e.value) and "b.weight" in str(e.value)


def test_collision_with_a_kept_tensor():
    state = {"a": torch.zeros(2), "b": torch.ones(2)}
    with pytest.raises(CollisionError, match="would overwrite the existing tensor 'b'"):
        sb.plan(DictSource(state), [sb.Rename(mapping={"a": "b"})])


def test_swap_names_in_one_step():
    state = {"a": torch.zeros(2), "b": torch.ones(2)}
    out = apply(state, [sb.Rename(mapping={"a": "b", "b": "a"})])
    assert torch.equal(out["a"], state["b"]) and torch.equal(out["b"], state["a"])


def test_drop_is_explicit_and_reported(llama_sd):
    plan = sb.plan(DictSource(llama_sd), [sb.Drop(keys=["lm_head.weight", "model.layers.*.input_layernorm.weight"])])
    assert plan.dropped == ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight"]
    assert "lm_head.weight" not in plan.outputs
    assert len(plan.outputs) == len(llama_sd) - 3
    with pytest.raises(NotInvertibleError):
        sb.Pipeline([sb.Drop(keys=["lm_head.weight"])]).inverse(DictSource(llama_sd).metas())


def test_identity_marks_keys_mapped(llama_sd):
    plan = sb.plan(DictSource(llama_sd), [sb.Identity(keys=["model.norm.weight"])])
    assert plan.mapped == ["model.norm.weight"] and "model.norm.weight" not in plan.unmapped


def test_identity_from_module():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    step = sb.identity_from_module(module)
    assert step.params.keys == ["0.weight", "0.bias", "2.weight", "2.bias"]
    plan = sb.plan(module, [step])
    assert plan.unmapped == [] and len(plan.mapped) == 4


QKV = dict(
    inputs=["model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight", "model.layers.*.self_attn.v_proj.weight"],
    output="model.layers.*.self_attn.qkv_proj.weight",
)


def test_concat_fuses_qkv_per_layer(llama_sd):
    out = apply(llama_sd, [sb.Concat(**QKV)])
    fused = out["model.layers.1.self_attn.qkv_proj.weight"]
    p = "model.layers.1.self_attn."
    assert torch.equal(fused, torch.cat([llama_sd[p + "q_proj.weight"], llama_sd[p + "k_proj.weight"], llama_sd[p + "v_proj.weight"]]))
    assert p + "q_proj.weight" not in out


def test_concat_split_round_trip_with_unequal_sizes(llama_sd):
    assert_round_trip(llama_sd, [sb.Concat(**QKV)])


def test_concat_missing_partner_is_named(llama_sd):
    del llama_sd["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(PlanError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        sb.plan(DictSource(llama_sd), [sb.Concat(**QKV)])


def test_concat_shape_mismatch_is_a_plan_error():
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)}
    with pytest.raises(PlanError, match="shapes differ"):
        sb.plan(DictSource(state), [sb.Concat(inputs=["a", "b"], output="c", dim=0)])
    assert apply(state, [sb.Concat(inputs=["a", "b"], output="c", dim=1)])["c"].shape == (2, 7)


def test_stack_unstack_round_trip_any_dim():
    state = {f"experts.{i}.w": torch.randn(4, 3) for i in range(3)} | {"other": torch.arange(5)}
    steps = [sb.Stack(inputs=["experts.0.w", "experts.1.w", "experts.2.w"], output="experts.w", dim=1)]
    out = apply(state, steps)
    assert out["experts.w"].shape == (4, 3, 3)
    assert_round_trip(state, steps)
    assert_round_trip(state, steps + [sb.Unstack(input="experts.w", outputs=["e0", "e1", "e2"], dim=1)])


def test_split_by_sizes_and_chunk_equal():
    state = {"w": torch.arange(24.0).reshape(6, 4)}
    out = apply(state, [sb.Split(input="w", outputs=["a", "b"], sizes=[1, 3], dim=1)])
    assert out["a"].shape == (6, 1) and out["b"].shape == (6, 3)
    out = apply(state, [sb.Chunk(input="w", outputs=["a", "b", "c"])])
    assert [out[k].shape for k in "abc"] == [(2, 4)] * 3
    with pytest.raises(PlanError, match="not divisible into 4"):
        sb.plan(DictSource(state), [sb.Chunk(input="w", outputs=list("abcd"))])
    with pytest.raises(PlanError, match="add up to 5"):
        sb.plan(DictSource(state), [sb.Split(input="w", outputs=["a", "b"], sizes=[2, 3])])
    assert_round_trip(state, [sb.Split(input="w", outputs=["a", "b"], sizes=[1, 5], dim=0)])


def test_transpose_permute_reshape_round_trip():
    state = {"a.w": torch.randn(2, 3, 4), "b.w": torch.randn(2, 3, 4), "c": torch.randn(5)}
    assert apply(state, [sb.Transpose(pattern="*.w", dims=(0, 2))])["a.w"].shape == (4, 3, 2)
    assert apply(state, [sb.Permute(pattern="*.w", dims=[2, 0, 1])])["a.w"].shape == (4, 2, 3)
    assert apply(state, [sb.Reshape(pattern="*.w", shape=[6, -1])])["a.w"].shape == (6, 4)
    assert_round_trip(state, [sb.Transpose(pattern="*.w"), sb.Permute(pattern="*.w", dims=[1, 2, 0]), sb.Reshape(pattern="*.w", shape=[-1])])
    with pytest.raises(PlanError, match="element counts differ|cannot reshape"):
        sb.plan(DictSource(state), [sb.Reshape(pattern="c", shape=[2, 2])])
    with pytest.raises(PlanError, match="not a permutation"):
        sb.plan(DictSource(state), [sb.Permute(pattern="a.w", dims=[0, 0, 1])])


def test_cast_leaves_integers_alone_by_default():
    state = {"w": torch.randn(3), "position_ids": torch.arange(4)}
    out = apply(state, [sb.Cast(dtype="bf16")])
    assert out["w"].dtype == torch.bfloat16 and out["position_ids"].dtype == torch.int64
    out = apply(state, [sb.Cast(dtype="int32", integers=True, pattern="position_ids")])
    assert out["position_ids"].dtype == torch.int32


def test_cast_inverse_only_when_lossless():
    state = {"w": torch.randn(3).half()}
    assert_round_trip(state, [sb.Cast(dtype="float32")])
    with pytest.raises(NotInvertibleError, match="loses information"):
        sb.Pipeline([sb.Cast(dtype="float16")]).inverse({"w": sb.TensorMeta((3,), torch.float32)})
    with pytest.raises(ConfigError, match="unknown dtype 'float13'"):
        sb.Cast(dtype="float13")


def test_value_ops_touch_only_what_they_name_and_are_listed():
    state = {"attn.q.weight": torch.ones(2, dtype=torch.bfloat16), "mlp.weight": torch.ones(2), "ids": torch.arange(2)}
    plan = sb.plan(DictSource(state), [sb.ValueOp(pattern="attn.**", op="scale", args={"factor": 0.5})])
    assert plan.changed == {"attn.q.weight": ("scale(factor=0.5)",)}
    assert "scale(factor=0.5)" in plan.render()
    out = apply(state, [sb.ValueOp(pattern="attn.**", op="scale", args={"factor": 0.5})])
    assert out["attn.q.weight"].dtype == torch.bfloat16 and out["attn.q.weight"].tolist() == [0.5, 0.5]
    assert torch.equal(out["mlp.weight"], state["mlp.weight"])
    out = apply(state, [sb.ValueOp(pattern="mlp.weight", op="clamp", args={"max": 0.25})])
    assert out["mlp.weight"].tolist() == [0.25, 0.25]
    with pytest.raises(PlanError, match="'ids'.*not floating point"):
        sb.plan(DictSource(state), [sb.ValueOp(pattern="ids", op="add", args={"value": 1})])
    with pytest.raises(ConfigError, match="op 'scale' takes"):
        sb.ValueOp(pattern="x", op="scale", args={"fctor": 2})


def test_adapt_shapes_slice_pad_copy_and_init_rest():
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4), "same": torch.zeros(2)}
    shapes = {"w": [2, 2], "b": [4]}
    out = apply(state, [sb.AdaptShapes(strategy="slice", shapes=shapes)])
    assert torch.equal(out["w"], state["w"][:2, :2])
    out = apply(state, [sb.AdaptShapes(strategy="pad", shapes={"w": [4, 6]}, pad_value=-1)])
    assert out["w"].shape == (4, 6) and torch.equal(out["w"][:3, :4], state["w"]) and out["w"][3, 5] == -1
    steps = [sb.AdaptShapes(strategy="copy_and_init_rest", shapes={"w": [2, 6]}, seed=3)]
    first, second = apply(state, steps), apply(state, steps)
    assert torch.equal(first["w"][:, :4], state["w"][:2]) and torch.equal(first["w"], second["w"])
    plan = sb.plan(DictSource(state), steps)
    assert plan.changed["w"] == ("adapt_shapes(copy_and_init_rest: [3, 4] to [2, 6])",)
    assert any(f.level == "warning" and f.key == "w" for f in plan.findings)
    with pytest.raises(PlanError, match="'slice' cannot grow"):
        sb.plan(DictSource(state), [sb.AdaptShapes(strategy="slice", shapes={"w": [4, 4]})])


def test_adapt_shapes_to_a_meta_module():
    with torch.device("meta"):
        target = torch.nn.Linear(3, 2)
    state = {"weight": torch.randn(4, 5), "bias": torch.randn(4)}
    out = apply(state, [sb.AdaptShapes.to_module(target, "slice")])
    assert out["weight"].shape == (2, 3) and out["bias"].shape == (2,)


def test_scope_runs_steps_under_a_prefix(llama_sd):
    out = apply(llama_sd, [sb.Scope(prefix="model.layers.0.", steps=[sb.Rename(pattern="self_attn.**", to="attn.**")])])
    assert "model.layers.0.attn.q_proj.weight" in out and "model.layers.1.self_attn.q_proj.weight" in out
    inner = {"concat": {**QKV, "inputs": [i.removeprefix("model.") for i in QKV["inputs"]], "output": "layers.*.qkv"}}
    assert_round_trip(llama_sd, [sb.as_pipeline([{"scope": {"prefix": "model.", "steps": [inner]}}])])  # config form, nested
    with pytest.raises(ConfigError, match=r"steps\[0\]: a step in config form .* needs the installed transforms"):
        sb.Scope(prefix="model.", steps=[inner])  # a bare composite has no catalog to build config-form steps with


def test_parallel_steps_must_be_disjoint(llama_sd):
    ok = [sb.Parallel([sb.Rename(mapping={"lm_head.weight": "out"}), sb.Cast(pattern="model.norm.weight", dtype="fp64")])]
    out = apply(llama_sd, ok)
    assert "out" in out and out["model.norm.weight"].dtype == torch.float64
    assert_round_trip(llama_sd, ok)
    with pytest.raises(PlanError, match="both read 'lm_head.weight'"):
        sb.plan(DictSource(llama_sd), [sb.Parallel([sb.Rename(mapping={"lm_head.weight": "a"}), sb.Rename(mapping={"lm_head.weight": "b"})])])


def test_sequential_steps_chain_into_one_group_per_component(llama_sd):
    steps = [
        sb.Rename(pattern="model.layers.*.self_attn.*.weight", to="L*.*"),
        sb.Concat(inputs=["L*.q_proj", "L*.k_proj", "L*.v_proj"], output="L*.qkv"),
        sb.Cast(pattern="L*.qkv", dtype="bf16"),
        sb.Rename(pattern="L*.qkv", to="layers.*.attention.qkv.weight"),
    ]
    plan = sb.plan(DictSource(llama_sd), steps)
    group = next(g for g in plan.groups if "layers.0.attention.qkv.weight" in g.outputs)
    assert group.inputs == tuple(f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv")
    assert plan.lineage["layers.0.attention.qkv.weight"].ops == ("rename", "concat(dim=0)", "cast(dtype=bfloat16, integers=False)", "rename")
    out = apply(llama_sd, steps)
    assert out["layers.0.attention.qkv.weight"].dtype == torch.bfloat16


def test_config_form_steps_and_unknown_names(monkeypatch):
    from statebridge.plugins import reset_plugins

    state = {"a": torch.zeros(1)}
    assert "b" in apply(state, [{"rename": {"mapping": {"a": "b"}}}])
    with pytest.raises(UnknownTransformError) as e:
        sb.plan(state, [{"renmae": {"mapping": {"a": "b"}}}])
    assert "did you mean 'rename'" in str(e.value)
    monkeypatch.setenv("STATEBRIDGE_DISABLE_PLUGINS", "lora")  # a reserved name whose plugin is not loaded
    reset_plugins()
    try:
        with pytest.raises(UnknownTransformError, match=r"pip install 'statebridge\[lora\]'"):
            sb.plan(state, [{"sequential": {"steps": [{"lora_merge": {}}]}}])
    finally:
        monkeypatch.delenv("STATEBRIDGE_DISABLE_PLUGINS")
        reset_plugins()
    with pytest.raises(ConfigError, match=r"steps\[0\]: rename.pattern|'pattern' needs 'to'"):
        sb.plan(state, [{"rename": {"pattern": "a"}}])


def test_params_reject_unknown_fields():
    with pytest.raises(ConfigError, match="stack.outptu: Extra inputs are not permitted"):
        sb.Stack(inputs=["a"], output="b", outptu="c")
