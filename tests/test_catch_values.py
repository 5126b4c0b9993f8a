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
