"""Group.zeros: an all-zero tensor from no input is written as zero bytes, raw, and still composes with later steps."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import statebridge as sb


class AddZeros(sb.Transform):
    """A new all-zero tensor beside each matching one (what llama_pro's zeroed copies are)."""

    name = "test.add_zeros"

    class Params(sb.Params):
        pattern: str

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        return [sb.Group.zeros(k + ".zero", metas[k], "zeros") for k in sb.select(self.params.pattern, metas)]


def source(tmp_path: Path) -> Path:
    save_file({"a": torch.randn(3, 5), "b": torch.arange(6, dtype=torch.int32)}, tmp_path / "in.safetensors")
    return tmp_path / "in.safetensors"


def test_zeros_are_written_as_raw_bytes(tmp_path: Path) -> None:
    built = sb.plan(source(tmp_path), [AddZeros(pattern="*")])
    spans = {k: s for g in built.groups for k, s in built.raw_spans(g).items()}
    assert [(s[0].path, s[0].length) for k, s in sorted(spans.items()) if k.endswith(".zero")] == [(None, 60), (None, 24)]
    report = sb.run(built, None, tmp_path / "out.safetensors", progress=False)
    assert report.stats.tensors_copied_raw == 4 and report.stats.tensors_written == 0
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["a.zero"], torch.zeros(3, 5)) and torch.equal(out["b.zero"], torch.zeros(6, dtype=torch.int32))


def test_zeros_compose_with_later_steps(tmp_path: Path) -> None:
    steps = [AddZeros(pattern="a"), sb.Rename(mapping={"a.zero": "c"}), sb.Cast(pattern="a", dtype="float16")]
    built = sb.plan(source(tmp_path), steps)
    assert built.raw_spans(next(g for g in built.groups if "c" in g.outputs))["c"][0].path is None  # renamed: still zeros
    sb.run(built, None, tmp_path / "out.safetensors", progress=False)
    cast = sb.plan(source(tmp_path), [AddZeros(pattern="a"), sb.Cast(pattern="a.zero", dtype="float16")])
    sb.run(cast, None, tmp_path / "cast.safetensors", progress=False)  # a step reading the zeros computes them
    assert torch.equal(load_file(tmp_path / "cast.safetensors")["a.zero"], torch.zeros(3, 5, dtype=torch.float16))
    assert torch.equal(load_file(tmp_path / "out.safetensors")["c"], torch.zeros(3, 5))
