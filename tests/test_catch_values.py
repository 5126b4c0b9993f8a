"""Transforms that change values or layout, checked value by value against torch.

The older tests checked shapes and round trips through a transform's own inverse, which a
``transpose`` written as a ``reshape`` passes (same shape, and reshaping back restores it).
Here every output is compared with what torch computes, after a real run to a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb


def run(tensors: dict[str, torch.Tensor], steps, tmp_path: Path) -> dict[str, torch.Tensor]:
    target = tmp_path / "out.safetensors"
    sb.run(dict(tensors), steps, target, progress=False)
    return load_file(target)


def values(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Distinct values, so any element out of place shows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


# -- layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dims"),
    [((3, 5), (0, 1)), ((4, 4), (0, 1)), ((2, 3, 4), (1, 2)), ((2, 3, 4), (-1, 0)), ((2, 3, 4), (2, 2))],
    ids=["matrix", "square", "inner", "negative", "same-dim"],
)
def test_transpose_moves_every_element_like_torch(tmp_path, shape, dims):
    x = values(*shape)
    out = run({"w": x, "kept": values(3)}, [sb.Transpose(pattern="w", dims=dims)], tmp_path)
    assert torch.equal(out["w"], x.transpose(*dims))
    assert torch.equal(out["kept"], values(3))


@pytest.mark.parametrize(("shape", "dims"), [((2, 3, 4), [2, 0, 1]), ((2, 3, 4), [1, 2, 0]), ((3, 3), [1, 0]), ((2, 3, 4, 5), [0, 3, 1, 2])])
def test_permute_moves_every_element_like_torch_and_its_inverse_puts_them_back(tmp_path, shape, dims):
    x = values(*shape)
    steps = [sb.Permute(pattern="w", dims=dims)]
    out = run({"w": x}, steps, tmp_path)
    assert torch.equal(out["w"], x.permute(dims))
    inverse = sb.Pipeline(steps).inverse({"w": sb.TensorMeta.of(x)})
    back = run({"w": out["w"]}, inverse, tmp_path / "back")
    assert torch.equal(back["w"], x)


def test_permute_with_negative_dims(tmp_path):
    x = values(2, 3, 4)
    out = run({"w": x}, [sb.Permute(pattern="w", dims=[-1, 0, 1])], tmp_path)
    assert torch.equal(out["w"], x.permute(2, 0, 1))


def test_reshape_keeps_row_major_order(tmp_path):
    x = values(4, 6)
    out = run({"w": x, "v": values(2, 3, 4)}, [sb.Reshape(pattern="w", shape=[3, -1]), sb.Reshape(pattern="v", shape=[6, 4])], tmp_path)
    assert torch.equal(out["w"], x.reshape(3, 8))
    assert torch.equal(out["v"], values(2, 3, 4).reshape(6, 4))


# -- casts and value operations -------------------------------------------------------------------


def test_cast_values_are_torch_casts_and_integers_stay_unless_asked(tmp_path):
    x, ids = values(5, 7), torch.arange(10, dtype=torch.int64) * 1000
    out = run({"x": x, "ids": ids}, [sb.Cast(dtype="bf16")], tmp_path)
    assert out["x"].dtype == torch.bfloat16 and torch.equal(out["x"], x.to(torch.bfloat16))
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], ids)
    out = run({"x": x, "ids": ids}, [sb.Cast(dtype="int32", integers=True, pattern="ids")], tmp_path / "ints")
    assert out["ids"].dtype == torch.int32 and torch.equal(out["ids"], ids.to(torch.int32))
    assert torch.equal(out["x"], x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("op", "args", "expected"),
    [
        ("scale", {"factor": 2.5}, lambda x: x * 2.5),
        ("add", {"value": -0.75}, lambda x: x - 0.75),
        ("clamp", {"min": -0.5, "max": 0.25}, lambda x: x.clamp(-0.5, 0.25)),
        ("clamp", {"max": 0.1}, lambda x: x.clamp(max=0.1)),
        ("fill", {"value": 3.5}, lambda x: torch.full_like(x, 3.5)),
        ("fill", {"value": -2}, lambda x: torch.full_like(x, -2)),
        ("zero", {}, lambda x: torch.zeros_like(x)),
    ],
    ids=["scale", "add", "clamp", "clamp-max", "fill", "fill-negative", "zero"],
)
def test_value_ops_compute_in_float32_and_cast_back(tmp_path, op, args, expected, dtype):
    x = values(6, 5, dtype=dtype) + 1  # no zeros, few ones: zero, fill and clamp must show
    out = run({"w": x, "other": values(3)}, [sb.ValueOp(pattern="w", op=op, args=args)], tmp_path)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert out["w"].dtype == dtype
    assert torch.equal(out["w"], expected(x.to(work)).to(dtype))
    assert torch.equal(out["other"], values(3))


# -- adapt_shapes -------------------------------------------------------------------------------


def test_adapt_shapes_slice_and_pad_values(tmp_path):
    x = values(6, 8)
    out = run({"s": x, "p": x}, [sb.AdaptShapes(strategy="slice", pattern="s", shapes={"s": [4, 5]}),
                                 sb.AdaptShapes(strategy="pad", pattern="p", shapes={"p": [7, 10]}, pad_value=-3.0)], tmp_path)
    assert torch.equal(out["s"], x[:4, :5])
    assert torch.equal(out["p"][:6, :8], x)
    assert (out["p"][6:, :] == -3).all() and (out["p"][:, 8:] == -3).all()


def adapt(tmp_path: Path, name: str, x: torch.Tensor, **params) -> torch.Tensor:
    steps = [sb.AdaptShapes(strategy="copy_and_init_rest", shapes={"w": [64, 96]}, **params)]
    return run({"w": x}, steps, tmp_path / name)["w"]


def test_copy_and_init_rest_copies_the_overlap_and_draws_the_rest_from_the_seeded_normal(tmp_path):
    x = values(48, 80, dtype=torch.bfloat16)
    out = adapt(tmp_path, "a", x, init_std=0.05, seed=3)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 96)
    assert torch.equal(out[:48, :80], x)
    rest = torch.cat([out[48:, :].flatten(), out[:48, 80:].flatten()]).float()
    assert (rest != 0).float().mean() > 0.99  # drawn, not zero-filled
    assert abs(rest.mean().item()) < 0.005 and 0.045 < rest.std().item() < 0.055  # normal(0, 0.05)
    assert torch.equal(adapt(tmp_path, "again", x, init_std=0.05, seed=3), out)  # seeded: reproducible
    other = adapt(tmp_path, "seed", x, init_std=0.05, seed=4)
    assert torch.equal(other[:48, :80], x) and not torch.equal(other, out)
    zeros = adapt(tmp_path, "zeros", x, init_std=0.0)
    assert torch.equal(zeros[:48, :80], x) and (zeros[48:] == 0).all() and (zeros[:, 80:] == 0).all()


def test_copy_and_init_rest_is_seeded_per_key(tmp_path):
    x = values(8, 8)
    steps = [sb.AdaptShapes(strategy="copy_and_init_rest", shapes={"a": [16, 16], "b": [16, 16]}, seed=0)]
    out = run({"a": x, "b": x}, steps, tmp_path)
    assert torch.equal(out["a"][:8, :8], out["b"][:8, :8]) and not torch.equal(out["a"], out["b"])


# -- from a file: layout steps that move elements are computed, never copied as raw bytes ---------------


def test_transpose_and_permute_from_a_file_are_computed_and_reshape_is_copied(tmp_path):
    from safetensors.torch import save_file

    tensors = {"t": values(3, 5), "p": values(2, 3, 4), "r": values(4, 6)}
    save_file(tensors, tmp_path / "src.safetensors")
    steps = [sb.Transpose(pattern="t"), sb.Permute(pattern="p", dims=[2, 0, 1]), sb.Reshape(pattern="r", shape=[-1])]
    report = sb.run(tmp_path / "src.safetensors", steps, tmp_path / "out.safetensors", progress=False)
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["t"], tensors["t"].T) and torch.equal(out["p"], tensors["p"].permute(2, 0, 1))
    assert torch.equal(out["r"], tensors["r"].reshape(-1))
    assert report.stats.tensors_written == 2 and report.stats.tensors_copied_raw == 1  # the reshape moved no bytes


# -- which dims and shapes are accepted -------------------------------------------------------------------


META = {"w": sb.TensorMeta((2, 3, 4), "float32")}


def headers(metas: dict[str, sb.TensorMeta]) -> dict[str, torch.Tensor]:
    """A state with these names, shapes and dtypes and no data (meta tensors): enough to plan."""
    return {k: torch.empty(m.shape, dtype=m.dtype.torch, device="meta") for k, m in metas.items()}


@pytest.mark.parametrize("dims", [(0, 3), (3, 0), (-4, 0), (0, -4)])
def test_transpose_refuses_dims_out_of_range_naming_the_key(dims):
    with pytest.raises(sb.PlanError, match=rf"cannot transpose dims \({dims[0]}, {dims[1]}\) of 'w' \(float32\[2, 3, 4\]\)"):
        sb.plan(headers(META), [sb.Transpose(pattern="w", dims=dims)])


def test_transpose_and_permute_accept_every_dim_from_minus_rank():
    assert sb.plan(headers(META), [sb.Transpose(pattern="w", dims=(-3, 2))]).outputs["w"].shape == (4, 3, 2)
    assert sb.plan(headers(META), [sb.Transpose(pattern="w", dims=(2, -3))]).outputs["w"].shape == (4, 3, 2)
    assert sb.plan(headers(META), [sb.Permute(pattern="w", dims=[-3, 2, 1])]).outputs["w"].shape == (2, 4, 3)


@pytest.mark.parametrize("dims", [[0, 1, 3], [3, 1, 0], [-4, 1, 2], [0, 1], [0, 1, 2, 3], [0, 3, 2], [0, 1, 5], [1, 2, 3], [-4, 0, 1]])
def test_permute_refuses_what_is_not_a_permutation_naming_the_key(dims):
    with pytest.raises(sb.PlanError, match=r"are not a permutation of the 3 dimensions of 'w'"):
        sb.plan(headers(META), [sb.Permute(pattern="w", dims=dims)])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([-1, -1], r"shape \[-1, -1\]: at most one -1 and no other negative sizes"),
        ([-2, 12], r"shape \[-2, 12\]: at most one -1 and no other negative sizes"),
        ([5, -1], r"cannot reshape 'w' \(float32\[2, 3, 4\]\) to \[5, -1\]$"),
        ([0, -1], r"cannot reshape 'w' \(float32\[2, 3, 4\]\) to \[0, -1\]$"),
        ([5, 5], r"cannot reshape 'w' \(float32\[2, 3, 4\]\) to \[5, 5\]: element counts differ"),
    ],
)
def test_reshape_refuses_shapes_that_do_not_fit(shape, message):
    with pytest.raises(sb.PlanError, match=message):
        sb.plan(headers(META), [sb.Reshape(pattern="w", shape=shape)])


def test_reshape_fills_in_the_one_minus_one():
    assert sb.plan(headers(META), [sb.Reshape(pattern="w", shape=[-1, 4])]).outputs["w"].shape == (6, 4)
    assert sb.plan(headers(META), [sb.Reshape(pattern="w", shape=[2, -1, 2])]).outputs["w"].shape == (2, 6, 2)


def test_reshape_of_tensors_of_different_shapes_has_no_inverse():
    metas = {"a.w": sb.TensorMeta((2, 3), "float32"), "b.w": sb.TensorMeta((3, 2), "float32")}
    with pytest.raises(sb.NotInvertibleError, match=r"reshape '\*.w' matched tensors of 2 different shapes"):
        sb.Pipeline([sb.Reshape(pattern="*.w", shape=[-1])]).inverse(metas)


@pytest.mark.parametrize(
    "step",
    [sb.Transpose(pattern="absent.*", strict=False), sb.Permute(pattern="absent.*", dims=[1, 0], strict=False),
     pytest.param(sb.Reshape(pattern="absent.*", shape=[-1], strict=False)),
     sb.ValueOp(pattern="absent.*", op="zero", strict=False)],
    ids=["transpose", "permute", "reshape", "value_op"],
)
def test_strict_false_lets_a_pattern_match_nothing_and_so_does_its_inverse(step):
    metas = {"w": sb.TensorMeta((2, 3), "float32")}
    assert sb.plan(headers(metas), [step]).outputs == metas
    with pytest.raises(sb.PlanError, match="matches no key"):
        sb.plan(headers(metas), [type(step)(**{**step.params.model_dump(), "strict": True})])
    if step.name != "value_op":
        assert sb.plan(headers(metas), sb.Pipeline([step]).inverse(metas)).outputs == metas


def test_a_value_op_with_several_arguments_is_listed_with_all_of_them():
    plan = sb.plan(headers({"w": sb.TensorMeta((2,), "float32")}), [sb.ValueOp(pattern="w", op="clamp", args={"min": -1, "max": 2})])
    assert plan.changed == {"w": ("clamp(max=2.0, min=-1.0)",)}


# -- which casts can be undone ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "invertible"),
    [
        ("float16", "float32", True), ("bfloat16", "float32", True), ("float32", "float64", True), ("float16", "float64", True),
        ("float8_e4m3fn", "float16", True), ("float8_e5m2", "float16", True), ("float8_e4m3fn", "bfloat16", True),
        ("float8_e5m2", "bfloat16", True), ("float8_e4m3fn", "float8_e5m2", False), ("float8_e5m2", "float8_e4m3fn", False),
        ("float32", "float16", False), ("float16", "bfloat16", False), ("bfloat16", "float16", False), ("float64", "float32", False),
        ("int8", "int16", True), ("int16", "int64", True), ("int32", "int64", True), ("uint8", "int16", True), ("uint8", "uint16", True),
        ("int16", "int8", False), ("int64", "int32", False), ("uint8", "int8", False), ("int8", "uint8", False), ("int8", "uint16", False),
        ("uint16", "int16", False), ("int32", "float64", False), ("float16", "int32", False), ("bool", "int8", False), ("int8", "bool", False),
    ],
)
def test_a_cast_is_invertible_exactly_when_every_value_survives_it(source, target, invertible):
    metas = {"w": sb.TensorMeta((2,), source)}
    pipeline = sb.Pipeline([sb.Cast(dtype=target, integers=True)])
    if invertible:
        inverse = pipeline.inverse(metas)
        forward = sb.plan(headers(metas), pipeline).outputs
        assert sb.plan(headers(forward), inverse).outputs["w"].dtype.name == source
    else:
        with pytest.raises(sb.NotInvertibleError, match=rf"cast {source} -> {target} loses information"):
            pipeline.inverse(metas)


def test_a_cast_merging_two_dtypes_casts_each_back_and_one_that_matched_nothing_undoes_nothing():
    metas = {"a": sb.TensorMeta((2,), "float16"), "b": sb.TensorMeta((2,), "bfloat16")}
    inverse = sb.Pipeline([sb.Cast(dtype="float32")]).inverse(metas)  # each tensor back to its own dtype
    forward = sb.plan(headers(metas), [sb.Cast(dtype="float32")]).outputs
    assert sb.plan(headers(forward), inverse).outputs == metas
    already = {"a": sb.TensorMeta((2,), "float32"), "i": sb.TensorMeta((2,), "int64")}
    inverse = sb.Pipeline([sb.Cast(dtype="float32")]).inverse(already)
    assert sb.plan(headers(already), inverse).outputs == already


def test_the_inverse_of_a_cast_touches_only_what_its_pattern_names(tmp_path):
    state = {"a": values(3, dtype=torch.float16), "b": values(3, dtype=torch.bfloat16), "c": values(3, dtype=torch.float32)}
    steps = [sb.Cast(pattern="a", dtype="float32")]
    out = run(state, steps, tmp_path)
    back = run(out, sb.Pipeline(steps).inverse({k: sb.TensorMeta.of(v) for k, v in state.items()}), tmp_path / "back")
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in state.items()}
    assert all(torch.equal(back[k], state[k]) for k in state)
    # a cast whose pattern matched nothing (strict: false by default) is undone by a step that does nothing
    nothing = [sb.Cast(pattern="absent.*", dtype="float32")]
    metas = {k: sb.TensorMeta.of(v) for k, v in state.items()}
    assert sb.plan(headers(metas), sb.Pipeline(nothing).inverse(metas)).outputs == metas
    already = [sb.Cast(pattern="c", dtype="float32")]  # matched a tensor that was float32 already
    assert sb.plan(headers(metas), sb.Pipeline(already).inverse(metas)).outputs == metas


def test_an_integer_cast_round_trips_with_integers_true(tmp_path):
    ids = torch.arange(6, dtype=torch.int32) * 1000
    steps = [sb.Cast(pattern="ids", dtype="int64", integers=True)]
    out = run({"ids": ids}, steps, tmp_path)
    assert out["ids"].dtype == torch.int64
    back = run(out, sb.Pipeline(steps).inverse({"ids": sb.TensorMeta.of(ids)}), tmp_path / "back")
    assert back["ids"].dtype == torch.int32 and torch.equal(back["ids"], ids)
