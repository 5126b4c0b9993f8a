"""GGUF in, GGUF out: quantized tensors a plan leaves unchanged keep their type and bytes (issue 14).

The real Gemma 3 270M Q4_K_M file is assembled into a tmp dir; its Q4_K, Q5_0, Q6_K and Q8_0
tensors must come out of a rename as the very same blocks, read back by ``gguf``'s own reader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

import statebridge as sb
from statebridge import ExecutionError
from statebridge.readers.gguf import GGUFSource
from statebridge.tensors.meta import TensorMeta
from statebridge.tensors.provenance import FINGERPRINT_KEY, LINEAGE_KEY, VERSION_KEY
from statebridge.writers.gguf import GGUFWriter

sys.path.insert(0, str(Path(__file__).parent))
from test_torch_free import run_cli  # noqa: E402

RENAMED = ("blk.0.attn_q.weight", "blk.0.attn_q_renamed.weight")


def _small(path: Path) -> Path:
    """A GGUF with a Q8_0 and a Q4_0 matrix beside a float32 norm, file type MOSTLY_Q8_0."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    rows = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
    writer.add_tensor("blk.0.w", gguf.quants.quantize(rows, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("blk.0.v", gguf.quants.quantize(rows[::-1].copy(), Q.Q4_0), raw_dtype=Q.Q4_0)
    writer.add_tensor("norm", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(path: Path) -> dict[str, tuple[Q, tuple[int, ...], bytes]]:
    """name -> (GGML type, ggml shape, stored bytes), by gguf's own reader."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, tuple(int(d) for d in t.shape), bytes(t.data.tobytes())) for t in reader.tensors}


def test_carried_quantized_tensors_keep_type_and_bytes(tmp_path: Path) -> None:
    source = _small(tmp_path / "s.gguf")
    sb.run(source, [sb.Rename(pattern="blk.0.v", to="blk.0.v2")], tmp_path / "o.gguf")
    before, after = _tensors(source), _tensors(tmp_path / "o.gguf")
    assert after["blk.0.w"] == before["blk.0.w"] and after["blk.0.w"][0] == Q.Q8_0
    assert after["blk.0.v2"] == before["blk.0.v"] and after["blk.0.v2"][0] == Q.Q4_0
    assert after["norm"] == before["norm"]
    assert GGUFSource(tmp_path / "o.gguf").fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_computed_from_quantized_is_float32_and_said(tmp_path: Path) -> None:
    """A step that changes values passes its input's meta along; the output must not claim the blocks."""
    source = _small(tmp_path / "s.gguf")
    steps = [sb.ValueOp(pattern="blk.0.w", op="scale", args={"factor": 2.0})]
    plan = sb.plan(source, steps)
    assert plan.outputs["blk.0.w"] == TensorMeta((4, 64), torch.float32)
    assert plan.outputs["blk.0.v"] == TensorMeta((4, 64), torch.float32, "Q4_0")
    shown = {k: v for group in plan.to_dict()["groups"] for k, v in group["outputs"].items()}
    assert shown["blk.0.w"] == "float32[4, 64]" and shown["blk.0.v"] == "float32[4, 64] (stored Q4_0)"
    sb.run(source, steps, tmp_path / "o.gguf")
    out = GGUFSource(tmp_path / "o.gguf")
    assert out.gguf_types == {"blk.0.w": "F32", "blk.0.v": "Q4_0", "norm": "F32"}
    assert torch.equal(out.load("blk.0.w"), GGUFSource(source).load("blk.0.w") * 2)
    # the source's MOSTLY_Q8_0 no longer describes the file: recomputed as llama.cpp guesses it
    assert out.fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    writer = sb.api.target_writer(plan, tmp_path / "again.gguf")
    assert writer.dequantized == ["blk.0.w"]
    assert any("1 tensors computed from quantized inputs are written in float32" in str(f) for f in plan.findings)


def test_safetensors_target_dequantizes_and_the_plan_says_so(tmp_path: Path) -> None:
    source = _small(tmp_path / "s.gguf")
    plan = sb.plan(source, None)
    assert "quantized, kept as stored blocks by a GGUF target" in plan.render()
    sb.api.target_writer(plan, tmp_path / "o.safetensors")
    assert not plan.keeps_stored and not plan.raw_spans(plan.groups[0])
    rendered = plan.render()
    assert "quantized, dequantized to float32 on writing: 1 Q4_0, 1 Q8_0" in rendered
    assert "2 quantized tensors (Q4_0, Q8_0) are dequantized to float32: safetensors has no such types" in rendered
    sb.run(source, None, tmp_path / "o.safetensors")
    written, reader = load_file(tmp_path / "o.safetensors"), GGUFSource(source)
    assert written["blk.0.w"].dtype == torch.float32
    assert all(torch.equal(written[k], reader.load(k)) for k in reader)


def test_stored_slot_is_only_filled_raw(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "o.gguf")
    writer.begin({"w": TensorMeta((4, 64), torch.float32, "Q8_0")})
    with pytest.raises(ExecutionError, match="announced as Q8_0 blocks"):
        writer.write("w", torch.zeros(4, 64))
    writer.abort()


def test_stored_type_in_meta_and_plan_figures(tmp_path: Path) -> None:
    source = GGUFSource(_small(tmp_path / "s.gguf"))
    meta = source.metas()["blk.0.w"]
    assert str(meta) == "float32[4, 64] (stored Q8_0)"
    assert meta.stored_nbytes == 4 * 64 // 32 * 34 and meta.nbytes == 4 * 64 * 4
    assert meta != TensorMeta((4, 64), torch.float32) and hash(meta) == hash(TensorMeta((4, 64), torch.float32, "Q8_0"))
    plan = sb.plan(source, None)
    sb.api.target_writer(plan, tmp_path / "o.gguf")
    assert plan.bytes_written == 4 * 64 // 32 * 34 + 4 * 64 // 32 * 18 + 64 * 4
    assert plan.to_dict()["groups"][0]["outputs"] == {"blk.0.w": "float32[4, 64] (stored Q8_0)"}


# -- the real Gemma 3 270M Q4_K_M ----------------------------------------------------------------------




@pytest.fixture(scope="module")
def renamed(gemma_path: Path, tmp_path_factory) -> tuple[Path, set[str], int]:
    """The Gemma file with one tensor renamed, by the command line: (output, modules imported, peak RSS)."""
    folder = tmp_path_factory.mktemp("renamed")
    target = folder / "gemma-renamed.gguf"
    config = folder / "rename.yaml"
    config.write_text(
        f"source: {gemma_path}\ntarget: {target}\nsteps:\n"
        f"  - rename: {{pattern: {RENAMED[0]!r}, to: {RENAMED[1]!r}}}\n"
    )
    modules, peak = run_cli("run", str(config))
    return target, modules, peak


def _stored(path: Path) -> dict[str, tuple[Q, tuple[int, ...], bytes]]:
    """name -> (GGML type, torch shape, stored bytes); gguf.GGUFReader takes a minute over Gemma's vocabulary."""
    source = GGUFSource(path)
    with open(path, "rb") as f:
        data = f.read()
    spans = {key: source.stored_span(key) for key in source}
    return {
        key: (Q[source.gguf_types[key]], source.metas()[key].shape, data[span.offset : span.offset + span.length])
        for key, span in spans.items()
    }


def test_gemma_rename_keeps_every_tensor_type_and_byte(gemma_path: Path, renamed: tuple[Path, set[str], int]) -> None:
    target = renamed[0]
    before, after = _stored(gemma_path), _stored(target)
    assert len(after) == len(before) == 236
    assert after[RENAMED[1]] == before[RENAMED[0]]
    assert RENAMED[0] not in after
    quantized = 0
    for name, (qtype, shape, data) in before.items():
        if name != RENAMED[0]:
            assert after[name] == (qtype, shape, data), name
        quantized += qtype not in (Q.F32, Q.F16)
    assert quantized == 127
    # the data section is the source's, byte for byte: the files differ only by their headers
    source, out = GGUFSource(gemma_path), GGUFSource(target)
    assert target.stat().st_size - gemma_path.stat().st_size == out.data_offset - source.data_offset
    for key, field in source.typed_fields.items():
        assert out.typed_fields[key] == field, key  # general.file_type (MOSTLY_Q4_K_M) too
    assert set(out.typed_fields) == set(source.typed_fields) | {VERSION_KEY, FINGERPRINT_KEY, LINEAGE_KEY}


def test_gemma_rename_imports_no_torch(renamed: tuple[Path, set[str], int]) -> None:
    _, modules, peak = renamed
    assert "torch" not in modules
    assert peak < 200 * 1024**2  # no tensor is held: the blocks move in the kernel


@pytest.mark.slow  # transformers reads each file with gguf.GGUFReader: about two minutes apiece
def test_gemma_through_statebridge_gives_transformers_the_same_logits(gemma_path: Path, tmp_path: Path) -> None:
    """A tensor renamed away and back (both through raw block copies) loads into the same model."""
    from transformers import AutoModelForCausalLM

    target = tmp_path / "gemma_path-roundtrip.gguf"
    steps = [sb.Rename(pattern=RENAMED[0], to="tmp.q"), sb.Rename(pattern="tmp.q", to=RENAMED[0])]
    report = sb.run(gemma_path, steps, target, progress=False, durable=False)
    assert report.stats.tensors_copied_raw == 236
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 236764, 1018]])
    logits = []
    for path in (gemma_path, target):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits)
        del model
    assert torch.equal(logits[0], logits[1])
