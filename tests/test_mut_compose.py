"""Composition of several steps keeps what each step declared: raw byte pieces, ops, effort and checks.

Written against the mutants of ``transforms/compose.py`` that the suite let live (docs/testing.md):
a merged group that forgot where its bytes lie would still compute the right values, only
slowly, so these tests look at the plan (pieces, raw spans, ops, effort) as well as the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.errors import ExecutionError
from statebridge.tensors.meta import TensorMeta
from statebridge.transforms.base import Candidates, Group, Piece, Transform
from statebridge.transforms.combine import Concat, Split
from statebridge.transforms.compose import compose
from statebridge.transforms.composite import Pipeline
from statebridge.transforms.rename import Rename
from statebridge.transforms.values import Cast

W = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # 48 bytes: rows of 12 bytes
V = torch.arange(100, 106, dtype=torch.float32).reshape(2, 3)  # 24 bytes


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.safetensors"
    save_file({"w": W, "v": V}, str(path))
    return path


def _only_group(plan: sb.Plan, output: str) -> Group:
    (group,) = [g for g in plan.groups if output in g.outputs]
    return group


def _span_bytes(plan: sb.Plan, group: Group, key: str) -> bytes:
    return b"".join(Path(s.path).read_bytes()[s.offset : s.offset + s.length] for s in plan.raw_spans(group)[key])


def test_a_tensor_renamed_twice_is_one_raw_copy_of_the_source(source: Path) -> None:
    plan = sb.plan(source, [Rename(mapping={"w": "a"}), Rename(mapping={"a": "b"})])
    group = _only_group(plan, "b")
    assert group.inputs == ("w",)
    assert dict(group.pieces) == {"b": (Piece("w", 0, 48),)}
    assert group.ops == ("rename",)
    assert _span_bytes(plan, group, "b") == W.numpy().tobytes()


def test_a_split_joined_in_another_order_is_raw_pieces_of_the_source(source: Path, tmp_path: Path) -> None:
    steps = [Split(input="w", outputs=["w0", "w1"], dim=0), Concat(inputs=["w1", "w0"], output="x", dim=0)]
    plan = sb.plan(source, steps)
    group = _only_group(plan, "x")
    assert dict(group.pieces) == {"x": (Piece("w", 24, 24), Piece("w", 0, 24))}
    expected = torch.cat([W[2:], W[:2]])
    assert _span_bytes(plan, group, "x") == expected.numpy().tobytes()
    sb.run(source, steps, tmp_path / "out.safetensors")
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["x"], expected)


def test_renamed_tensors_joined_are_raw_pieces_of_both_sources(source: Path) -> None:
    steps = [Rename(mapping={"w": "w1", "v": "v1"}), Concat(inputs=["v1", "w1"], output="vw", dim=0)]
    plan = sb.plan(source, steps)
    group = _only_group(plan, "vw")
    assert dict(group.pieces) == {"vw": (Piece("v", 0, 24), Piece("w", 0, 48))}
    assert _span_bytes(plan, group, "vw") == torch.cat([V, W]).numpy().tobytes()


def test_a_key_left_in_a_component_merged_into_another_is_still_found(source: Path, tmp_path: Path) -> None:
    """A split's second part stays live after its first part is joined with another step's output; a later
    step that reads it joins the same merged group (the merged-away component's keys point to the survivor)."""
    steps = [
        Split(input="w", outputs=["w0", "w1"], dim=0),
        Rename(mapping={"v": "v1"}),
        Concat(inputs=["v1", "w0"], output="c", dim=0),
        Rename(mapping={"w1": "z"}),
    ]
    plan = sb.plan(source, steps)
    (group,) = plan.groups
    assert set(group.inputs) == {"w", "v"} and set(group.outputs) == {"c", "z"}
    sb.run(source, steps, tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["c"], torch.cat([V, W[:2]])) and torch.equal(out["z"], W[2:])


def test_a_merged_group_with_a_computed_output_claims_no_raw_pieces(source: Path, tmp_path: Path) -> None:
    """``pieces`` promises every output is source bytes: one computed output (a cast) withdraws the promise."""
    steps = [Split(input="w", outputs=["w0", "w1"], dim=0), Cast(pattern="w1", dtype="float16")]
    plan = sb.plan(source, steps)
    group = _only_group(plan, "w1")
    assert set(group.outputs) == {"w0", "w1"}
    assert group.pieces is None
    assert plan.raw_spans(group) == {}
    sb.run(source, steps, tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["w0"], W[:2]) and torch.equal(out["w1"], W[2:].half())


class _Heavy(Transform):
    """Doubles one tensor and says it costs ``effort`` passes (a matmul, an SVD ...)."""

    name = "test.heavy"

    def __init__(self, key: str, effort: float | None) -> None:
        super().__init__()
        self.key, self.effort = key, effort

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        return [Group.map_one(self.key, self.key, metas[self.key], lambda t: t * 2, "heavy", effort=self.effort)]


METAS = {"w": TensorMeta((4, 3), "float32"), "v": TensorMeta((2, 3), "float32")}


def test_a_merged_group_adds_up_the_effort_of_its_steps() -> None:
    (group,) = compose([_Heavy("w", 5.0), _Heavy("w", 3.0)], METAS).groups
    assert group.effort == 8.0
    (group,) = compose([_Heavy("w", 5.0), Rename(mapping={"w": "u"})], METAS).groups
    assert group.effort == 6.0  # the rename is one pass
    (group,) = compose([_Heavy("w", None), Rename(mapping={"w": "u"})], METAS).groups
    assert group.effort is None  # no step said: one pass per op, as for any group
    assert group.ops == ("heavy", "rename")


class _Liar(Transform):
    """Plans ``key`` as it is but computes something else: another dtype, or nothing at all."""

    name = "test.liar"

    def __init__(self, key: str, produce) -> None:
        super().__init__()
        self.key, self.produce = key, produce

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        return [Group(inputs=(self.key,), outputs={self.key: metas[self.key]}, compute=self.produce, ops=("lie",))]


def test_a_merged_group_refuses_a_step_that_computes_another_dtype() -> None:
    (group,) = compose([Rename(mapping={"w": "u"}), _Liar("u", lambda t: {"u": t["u"].half()})], METAS).groups
    with pytest.raises(ExecutionError, match=r"steps\[1\] \(test.liar\): produced 'u' as float16\[4, 3\] but planned float32\[4, 3\]"):
        group.compute({"w": W.clone()})


def test_a_merged_group_refuses_a_step_that_computes_another_shape() -> None:
    (group,) = compose([Rename(mapping={"w": "u"}), _Liar("u", lambda t: {"u": t["u"].T})], METAS).groups
    with pytest.raises(ExecutionError, match=r"produced 'u' as float32\[3, 4\] but planned float32\[4, 3\]"):
        group.compute({"w": W.clone()})


def test_a_merged_group_refuses_a_step_that_leaves_out_an_output() -> None:
    (group,) = compose([Rename(mapping={"w": "u"}), _Liar("u", lambda t: {})], METAS).groups
    with pytest.raises(ExecutionError, match=r"steps\[1\] \(test.liar\): planned to produce 'u' but did not"):
        group.compute({"w": W.clone()})


def test_candidates_pass_through_a_merged_group_checked_one_by_one() -> None:
    good = _Liar("u", lambda t: {"u": Candidates([t["u"] + 1, t["u"] - 1], ["up", "down"])})
    (group,) = compose([Rename(mapping={"w": "u"}), good], METAS).groups
    out = group.compute({"w": W.clone()})["u"]
    assert isinstance(out, Candidates) and torch.equal(out.options[1], W - 1)
    bad = _Liar("u", lambda t: {"u": Candidates([t["u"], t["u"].half()])})
    (group,) = compose([Rename(mapping={"w": "u"}), bad], METAS).groups
    with pytest.raises(ExecutionError, match="float16"):
        group.compute({"w": W.clone()})


def test_a_composite_step_plans_its_steps_as_one_pipeline() -> None:
    """``Composite.plan`` (a nested step planned on its own) gives the groups its composition gives."""
    nested = Pipeline([Rename(mapping={"w": "a"}), Rename(mapping={"a": "b"})])
    (group,) = nested.plan(METAS)
    assert group.inputs == ("w",) and list(group.outputs) == ["b"]
    assert dict(group.pieces) == {"b": (Piece("w", 0, 48),)}


class _Groups(Transform):
    """Hands composition the groups it is given: to see what composition does with odd ones."""

    name = "test.groups"

    def __init__(self, *groups: Group) -> None:
        super().__init__()
        self.groups = list(groups)

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        return self.groups


def _copy(t):
    return {"u": t["w"].clone()}


def test_a_step_reading_a_missing_key_is_refused_naming_the_nearest() -> None:
    step = _Groups(Group(inputs=("layer.weigth",), outputs={"u": METAS["w"]}, compute=_copy))
    with pytest.raises(sb.PlanError) as e:
        compose([step], {"layer.weight": METAS["w"], "other": METAS["v"]})
    assert str(e.value) == "steps[0] (test.groups): source key 'layer.weigth' is not in the state; did you mean 'layer.weight'?"


def test_a_tensor_read_twice_says_by_one_group_or_by_two() -> None:
    one = _Groups(Group(inputs=("w", "w"), outputs={"u": METAS["w"]}, compute=_copy))
    with pytest.raises(sb.PlanError) as e:
        compose([one], METAS)
    assert str(e.value) == "steps[0] (test.groups): 'w' is read twice by one group; a step may consume each tensor once"
    two = _Groups(
        Group(inputs=("w",), outputs={"u": METAS["w"]}, compute=_copy),
        Group(inputs=("w",), outputs={"x": METAS["w"]}, compute=_copy),
    )
    with pytest.raises(sb.PlanError) as e:
        compose([two], METAS)
    assert str(e.value) == "steps[0] (test.groups): 'w' is read by two groups; a step may consume each tensor once"


def test_writing_over_a_kept_tensor_says_how_to_fix_it() -> None:
    with pytest.raises(sb.CollisionError) as e:
        compose([Rename(mapping={"w": "v"})], METAS)
    assert str(e.value) == (
        "steps[0] (rename): target 'v' (from [w]) would overwrite the existing tensor 'v', which this step keeps; "
        "drop or rename it first"
    )


def test_a_group_of_several_inputs_reads_them_in_storage_order() -> None:
    """``w`` is stored before ``v`` (METAS' order), whatever the order the step names them in, or the alphabet's."""
    (group,) = compose([Concat(inputs=["v", "w"], output="vw", dim=0)], METAS).groups
    assert group.inputs == ("w", "v")
    assert dict(group.pieces) == {"vw": (Piece("v", 0, 24), Piece("w", 0, 48))}  # the bytes still join v, then w
    out = group.compute({"w": W.clone(), "v": V.clone()})
    assert torch.equal(out["vw"], torch.cat([V, W]))


def test_one_split_is_raw_pieces_of_its_source() -> None:
    (group,) = compose([Split(input="w", outputs=["w0", "w1"], dim=0)], METAS).groups
    assert dict(group.pieces) == {"w0": (Piece("w", 0, 24),), "w1": (Piece("w", 24, 24),)}


def test_pieces_declared_for_some_outputs_only_are_not_pieces() -> None:
    """``pieces`` promises every output; a group that declares some outputs' bytes is computed."""
    meta = TensorMeta((2, 3), "float32")
    partial = Group(
        inputs=("w",), outputs={"a": meta, "b": meta}, compute=lambda t: {"a": t["w"][:2], "b": t["w"][2:] * 2},
        pieces={"a": (Piece("w", 0, 24),)},
    )
    (group,) = compose([_Groups(partial)], METAS).groups
    assert group.pieces is None
    foreign = Group(inputs=("w",), outputs={"a": meta}, compute=lambda t: {"a": t["w"][:2]}, pieces={"a": (Piece("v", 0, 24),)})
    (group,) = compose([_Groups(foreign)], METAS).groups
    assert group.pieces is None  # bytes of a tensor the group does not read are not its pieces


def test_one_step_computing_another_dtype_is_refused() -> None:
    (group,) = compose([_Liar("w", lambda t: {"w": t["w"].half()})], METAS).groups
    with pytest.raises(ExecutionError, match=r"steps\[0\] \(test.liar\): produced 'w' as float16\[4, 3\] but planned float32\[4, 3\]"):
        group.compute({"w": W.clone()})


def test_one_step_keeps_its_effort_and_ops_once_each() -> None:
    (group,) = compose([_Heavy("w", 5.0)], METAS).groups
    assert group.effort == 5.0 and group.ops == ("heavy",)
    twice = Group(inputs=("w",), outputs={"w": METAS["w"]}, compute=lambda t: {"w": t["w"] * 4}, ops=("heavy", "heavy"))
    (group,) = compose([_Groups(twice)], METAS).groups
    assert group.ops == ("heavy",)


def test_a_carried_group_stays_as_it_was_declared() -> None:
    """A group whose compute is a ``Carry`` (bytes handed on) is the plan's group as it is: nothing to check."""
    from statebridge.transforms.base import Carry

    carry = Group(inputs=("w",), outputs={"u": METAS["w"]}, compute=Carry("w", "u"), ops=("rename",), pieces={"u": (Piece("w", 0, 48),)})
    (group,) = compose([_Groups(carry)], METAS).groups
    assert group is carry


def test_the_json_plan_names_each_field(source: Path) -> None:
    plan = sb.plan(source, [Rename(mapping={"w": "u"}), sb.as_pipeline([{"drop": {"keys": ["v"]}}]).steps[0]])
    data = plan.to_dict()
    assert data["source"] == plan.source.name and data["fingerprint"] == plan.fingerprint
    assert data["bytes_read"] == 48 and data["bytes_written"] == 48 and data["largest_group_bytes"] == 96
    assert data["groups"] == [{"inputs": ["w"], "outputs": {"u": "float32[4, 3]"}, "ops": ["rename"]}]
    assert data["dropped"] == ["v"] and data["new"] == [] and data["unmapped"] == []
    assert data["estimate"] is None and data["model_folder"] is None
    assert any("dropped on purpose" in f for f in data["findings"])


def test_lineage_follows_every_input_and_keeps_earlier_ops(source: Path) -> None:
    from statebridge.transforms.rename import Identity

    plan = sb.plan(source, [Concat(inputs=["v", "w"], output="vw", dim=0)])
    assert plan.lineage["vw"].sources == ("v", "w") and plan.lineage["vw"].ops == ("concat(dim=0)",)
    plan = sb.plan(source, [Cast(pattern="w", dtype="float16"), Identity(keys=["w"])])
    assert plan.lineage["w"].ops == ("cast(dtype=float16, integers=False)",)  # a step that changes nothing keeps the history


def test_a_source_tensor_joined_with_a_renamed_one_is_raw_and_mapped(source: Path) -> None:
    plan = sb.plan(source, [Rename(mapping={"v": "v1"}), Concat(inputs=["v1", "w"], output="vw", dim=0)])
    group = _only_group(plan, "vw")
    assert dict(group.pieces) == {"vw": (Piece("v", 0, 24), Piece("w", 0, 48))}
    assert sorted(plan.mapped) == ["v", "w"] and plan.unmapped == []


def test_raw_spans_of_a_split_are_its_parts_of_the_source_file(source: Path) -> None:
    plan = sb.plan(source, [Split(input="w", outputs=["w0", "w1"], dim=0)])
    group = _only_group(plan, "w0")
    whole = plan.source.raw_span("w")
    spans = plan.raw_spans(group)
    assert [(s.offset, s.length) for s in spans["w0"]] == [(whole.offset, 24)]
    assert [(s.offset, s.length) for s in spans["w1"]] == [(whole.offset + 24, 24)]
    assert _span_bytes(plan, group, "w1") == W[2:].numpy().tobytes()


def test_raw_spans_of_a_group_carrying_two_whole_tensors_cover_both(source: Path) -> None:
    both = Group(
        inputs=("w", "v"), outputs={"a": METAS["w"], "b": METAS["v"]}, compute=lambda t: {"a": t["w"], "b": t["v"]},
        pieces={"a": (Piece("w", 0, 48),), "b": (Piece("v", 0, 24),)},
    )
    plan = sb.plan(source, [_Groups(both)])
    spans = plan.raw_spans(_only_group(plan, "a"))
    assert spans["a"] == [plan.source.raw_span("w")] and spans["b"] == [plan.source.raw_span("v")]


def test_a_piece_past_the_end_of_its_tensor_is_never_copied_raw(source: Path) -> None:
    meta = TensorMeta((4, 3), "float32")
    past = Group(inputs=("w",), outputs={"a": meta}, compute=lambda t: {"a": t["w"]}, pieces={"a": (Piece("w", 24, 48),)})
    plan = sb.plan(source, [_Groups(past)])
    assert plan.raw_spans(_only_group(plan, "a")) == {}


def test_the_text_plan_names_each_section(source: Path) -> None:
    fresh = Group(inputs=(), outputs={"fresh": TensorMeta((2,), "float32")}, compute=lambda t: {"fresh": torch.zeros(2)})
    plan = sb.plan(source, [Cast(pattern="w", dtype="float16"), {"drop": {"keys": ["v"]}}, _Groups(fresh)])
    assert plan.render().splitlines()[1:] == [
        "  2 source tensors, 2 target tensors, 2 groups, 1 mapped, 0 unmapped, 1 dropped, 1 new",
        "  reads 48 B, writes 32 B, largest group 72 B",
        "  dropped (1):",
        "    v",
        "  new (1):",
        "    fresh",
        "  changes:",
        "    cast(dtype=float16, integers=False):",
        "      w",
        "  info (plan.types): type change F32 -> F16: 1 tensors, w",
        "  info (core.dropped): 1 source tensors are dropped on purpose",
    ]
    assert plan.render().splitlines()[0] == f"plan for {plan.source.name}: 3 steps, fingerprint {plan.fingerprint[:16]}"
    assert plan.counts() == {"source tensors": 2, "target tensors": 2, "groups": 2, "mapped": 1, "unmapped": 0, "dropped": 1, "new": 1}


def test_the_text_plan_lists_unchanged_tensors_folded_unless_verbose(tmp_path: Path) -> None:
    path = tmp_path / "layers.safetensors"
    save_file({f"layers.{i}.w": torch.zeros(2) for i in range(3)} | {"x": torch.zeros(2)}, str(path))
    plan = sb.plan(path, [Rename(mapping={"x": "y"})])
    text = plan.render()
    assert "  unchanged (no step touched them) (3):\n    layers.{0..2}.w" in text
    assert "    rename:\n      y" in text
    assert "    layers.0.w\n    layers.1.w\n    layers.2.w" in plan.render(verbose=True)


def test_dropped_and_new_tensors_are_listed_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / "layers.safetensors"
    save_file({f"layers.{i}.w": torch.zeros(2) for i in range(3)}, str(path))
    text = sb.plan(path, [{"drop": {"keys": ["layers.*.w"]}}]).render()
    assert "  dropped (3):\n    layers.0.w\n    layers.1.w\n    layers.2.w" in text


def test_a_composite_planned_alone_reports_its_drops() -> None:
    from statebridge.transforms.rename import Drop

    groups = Pipeline([Rename(mapping={"w": "u"}), Drop(keys=["v"])]).plan(METAS)
    assert [(g.inputs, list(g.outputs)) for g in groups] == [(("w",), ["u"]), (("v",), [])]


@pytest.fixture
def quantized(tmp_path: Path) -> Path:
    """A small GGUF: Q8_0 ``blk.0.w``, Q4_0 ``blk.0.v`` and a float32 ``norm`` (test_gguf_passthrough's)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_gguf_passthrough import _small

    return _small(tmp_path / "small.gguf")


def test_one_group_carrying_two_quantized_tensors_copies_both_as_blocks(quantized: Path, tmp_path: Path) -> None:
    source = sb.open_source(quantized)
    metas = source.metas()
    w, v = metas["blk.0.w"], metas["blk.0.v"]
    both = Group(
        inputs=("blk.0.w", "blk.0.v"), outputs={"a": w, "b": v}, compute=lambda t: {"a": t["blk.0.w"], "b": t["blk.0.v"]},
        pieces={"a": (Piece("blk.0.w", 0, w.nbytes),), "b": (Piece("blk.0.v", 0, v.nbytes),)},
    )
    plan = sb.plan(quantized, [_Groups(both)])
    assert plan.outputs["a"].stored == "Q8_0" and plan.outputs["b"].stored == "Q4_0"
    assert "  quantized, kept as stored blocks by a GGUF target, dequantized to float32 by others: 1 Q4_0, 1 Q8_0" in plan.render()
    plan.keeps_stored = True
    spans = plan.raw_spans(_only_group(plan, "a"))
    assert spans == {"a": [source.stored_span("blk.0.w")], "b": [source.stored_span("blk.0.v")]}


def test_the_text_plan_counts_quantized_tensors_by_type(tmp_path: Path) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "three.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    rows = np.linspace(-1, 1, 2 * 32, dtype=np.float32).reshape(2, 32)
    for name in ("a", "b", "c"):
        writer.add_tensor(name, gguf.quants.quantize(rows, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "dequantized to float32 by others: 3 Q8_0" in sb.plan(path, []).render()


@pytest.mark.parametrize(
    "piece",
    [
        pytest.param(lambda nbytes: Piece("blk.0.w", 0, nbytes // 2), id="part of the tensor"),
        pytest.param(lambda nbytes: Piece("blk.0.w", 2, nbytes), id="shifted, past its end"),
        pytest.param(lambda nbytes: Piece("norm", 0, 256), id="whole, but a float32 tensor"),
    ],
)
def test_a_stored_type_is_kept_only_for_a_whole_copy_of_a_tensor_of_that_type(quantized: Path, piece) -> None:
    """A group that hands on a quantized tensor's meta but not its whole blocks computes the output in float."""
    w = sb.open_source(quantized).metas()["blk.0.w"]
    group = Group(inputs=("blk.0.w", "norm"), outputs={"a": w}, compute=lambda t: {"a": t["blk.0.w"]}, pieces={"a": (piece(w.nbytes),)})
    plan = sb.plan(quantized, [_Groups(group)])
    assert plan.outputs["a"].stored is None and plan.outputs["a"].dtype == w.dtype


def test_walk_yields_every_step_however_nested() -> None:
    """``Transform.walk``: what a ``validate_plan`` hook looks through to find its own steps."""
    from statebridge.transforms.composite import Parallel
    from statebridge.transforms.rename import Drop

    inner = Rename(mapping={"w": "a"})
    drop = Drop(keys=["v"])
    nested = Pipeline([Parallel([inner, drop]), Cast(pattern="a", dtype="float16")])
    assert [type(step).__name__ for step in nested.walk()] == ["Pipeline", "Parallel", "Rename", "Drop", "Cast"]
    assert list(inner.walk()) == [inner]
