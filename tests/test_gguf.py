"""GGUF: the lazy reader against files written by llama.cpp's own ``gguf`` package and the real
Gemma 3 270M Q4_K_M model, the streaming writer against ``gguf.GGUFReader``, and broken files."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

import statebridge as sb
from statebridge.errors import ConfigError, ExecutionError, SourceError
from statebridge.readers import open_source
from statebridge.readers.gguf import GGUFField, GGUFSource
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.gguf import GGUFWriter

Q = GGMLQuantizationType
PLAIN = {Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}


def _write_with_gguf(path: Path, tensors: list[tuple[str, np.ndarray, Q | None]], arch: str = "llama", **kw) -> Path:
    """Write a GGUF file with the gguf package's own writer (the reference implementation)."""
    writer = gguf.GGUFWriter(path, arch, **kw)
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "héllo", "▁world"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0])
    writer.add_string("general.name", "tiny")
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _quantized(qtype: Q, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Bytes of a ``shape`` tensor in ``qtype``: quantized by gguf where it can, random blocks otherwise."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32)
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        byte_shape = quant_shape_to_byte_shape(shape, qtype)
        return rng.integers(0, 256, size=byte_shape, dtype=np.uint8)


def _dequantizable() -> list[Q]:
    out = []
    for qtype in Q:
        if qtype in PLAIN:
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        out.append(qtype)
    return out


def _reference(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    (t,) = [t for t in reader.tensors if t.name == name]
    if t.tensor_type in PLAIN and t.tensor_type != Q.BF16:
        return np.array(t.data)
    return gguf.quants.dequantize(t.data, t.tensor_type)


@pytest.fixture
def plain_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {
        "token_embd.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "blk.0.ffn_up.weight": rng.standard_normal((3, 4, 8)).astype(np.float32),
        "blk.0.ids": np.arange(-5, 5, dtype=np.int32),
        "blk.0.long": np.arange(7, dtype=np.int64),
        "blk.0.double": rng.standard_normal(5),
    }
    path = _write_with_gguf(tmp_path / "plain.gguf", [(k, v, None) for k, v in arrays.items()])
    return path, arrays


# -- reading files written by gguf.GGUFWriter -------------------------------------------------------


def test_plain_tensors_shapes_dtypes_and_zero_copy(plain_gguf) -> None:
    path, arrays = plain_gguf
    source = open_source(path)
    assert isinstance(source, GGUFSource)
    reader = gguf.GGUFReader(path)
    assert list(source.metas()) == [t.name for t in sorted(reader.tensors, key=lambda t: t.data_offset)]
    for name, array in arrays.items():
        tensor = source.load(name)
        assert source.metas()[name] == TensorMeta(array.shape, tensor.dtype)
        assert tensor.dtype == torch.from_numpy(array).dtype
        assert np.array_equal(tensor.numpy(), array)
        assert np.array_equal(tensor.numpy(), _reference(reader, name))
        span = source.raw_span(name)
        assert span is not None and span.length == array.nbytes
        with open(path, "rb") as f:
            f.seek(span.offset)
            assert f.read(span.length) == array.tobytes()
    # loads are views of a private copy-on-write map: editing one never touches the file
    before = path.read_bytes()
    source.load("token_embd.weight").add_(1)
    assert path.read_bytes() == before


def test_metadata_strings_and_fields(plain_gguf) -> None:
    path, _ = plain_gguf
    source = GGUFSource(path)
    assert source.version == 3 and source.alignment == 32 and source.byte_order == "little"
    md = source.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == "2"
    assert md["llama.attention.layer_norm_rms_epsilon"] == "1e-06"
    assert md["tokenizer.ggml.add_bos_token"] == "True"
    assert md["tokenizer.ggml.tokens"] == '["<s>", "</s>", "héllo", "▁world"]'
    assert md["tokenizer.ggml.scores"] == "[0.0, -1.5, 2.25, 3.0]"
    assert source.fields["tokenizer.ggml.tokens"] == ["<s>", "</s>", "héllo", "▁world"]
    assert source.fields["llama.block_count"] == 2
    assert source.typed_fields["llama.block_count"] == GGUFField(2, GGUFValueType.UINT32)
    assert source.typed_fields["tokenizer.ggml.scores"].sub_type == GGUFValueType.FLOAT32
    assert all(isinstance(v, str) for v in md.values())


def test_long_arrays_are_summarised(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(5000)])
    writer.add_tensor("w", np.ones((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = GGUFSource(tmp_path / "vocab.gguf")
    assert source.metadata["tokenizer.ggml.tokens"] == "[5000 items]"
    assert len(source.fields["tokenizer.ggml.tokens"]) == 5000


def test_carried_arrays_are_written_back_as_stored(tmp_path: Path) -> None:
    """Arrays carried unchanged are copied as the source stores them, not decoded and packed again.

    Decoding turns a float32 into a Python float: a signalling NaN comes back quiet, and a
    vocabulary's bits would change; the copy keeps them, and opening decodes nothing.
    """
    writer = gguf.GGUFWriter(tmp_path / "src.gguf", "llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "héllo"] * 300)
    writer.add_array("tokenizer.ggml.scores", [0.5] * 599 + [1.25])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_tensor("w", np.ones((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    scores = struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.FLOAT32, 600) + struct.pack("<599f", *[0.5] * 599)
    # the last score becomes a signalling NaN (gguf's writer, packing Python floats, cannot write one)
    stored = (tmp_path / "src.gguf").read_bytes().replace(scores + struct.pack("<f", 1.25), scores + struct.pack("<I", 0x7F800001))
    assert scores + struct.pack("<I", 0x7F800001) in stored
    (tmp_path / "src.gguf").write_bytes(stored)

    source = GGUFSource(tmp_path / "src.gguf")
    assert source.metadata["tokenizer.ggml.tokens"] == "[600 items]"
    assert source.typed_fields["tokenizer.ggml.tokens"].count == 600
    out = tmp_path / "out.gguf"
    sb.run(tmp_path / "src.gguf", None, out, progress=False, durable=False)
    written = out.read_bytes()
    assert scores + struct.pack("<I", 0x7F800001) in written  # bit for bit
    kv_start = stored.index(b"tokenizer.ggml.tokens") - 8
    kv_end = stored.index(b"w", stored.index(b"nested") + 6) - 8  # the first tensor info
    assert stored[kv_start:kv_end] in written  # the whole run of key-values, unchanged
    copy = GGUFSource(out)
    assert copy.fields["nested"] == [[1, 2], [3]]
    assert copy.fields["tokenizer.ggml.tokens"] == ["<s>", "héllo"] * 300
    assert copy.typed_fields["tokenizer.ggml.scores"] == source.typed_fields["tokenizer.ggml.scores"]


@pytest.mark.parametrize("qtype", _dequantizable(), ids=lambda q: q.name)
def test_quantized_tensors_dequantize_like_gguf(tmp_path: Path, qtype: Q) -> None:
    block, _ = GGML_QUANT_SIZES[qtype]
    shape = (3, 2 * block)
    blocks = _quantized(qtype, shape, seed=int(qtype))
    path = _write_with_gguf(
        tmp_path / "q.gguf", [("norm", np.ones(4, dtype=np.float32), None), ("w", blocks, qtype)]
    )
    source = GGUFSource(path)
    assert source.gguf_types == {"norm": "F32", "w": qtype.name}
    assert source.metas()["w"] == TensorMeta(shape, torch.float32, qtype.name)  # what load returns, stored as blocks
    assert source.is_quantized("w") and not source.is_quantized("norm")
    assert source.raw_span("w") is None and source.raw_span("norm") is not None
    tensor = source.load("w")
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shape
    expected = _reference(gguf.GGUFReader(path), "w")
    assert np.array_equal(tensor.numpy(), expected, equal_nan=True)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q4_1], ids=lambda q: q.name)
def test_quantize_then_load_is_close_to_the_original(tmp_path: Path, qtype: Q) -> None:
    values = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    path = _write_with_gguf(tmp_path / "q.gguf", [("w", gguf.quants.quantize(values, qtype), qtype)])
    loaded = GGUFSource(path).load("w").numpy()
    tolerance = {Q.Q8_0: 0.03, Q.Q5_0: 0.15, Q.Q5_1: 0.15}.get(qtype, 0.35)
    assert np.abs(loaded - values).max() < tolerance


def test_bfloat16_loads_bit_exact(tmp_path: Path) -> None:
    values = torch.randn(4, 8).bfloat16()
    raw = values.view(torch.int16).numpy().view(np.uint8).reshape(4, 16)
    path = _write_with_gguf(tmp_path / "bf16.gguf", [("w", raw, Q.BF16)])
    source = GGUFSource(path)
    assert source.gguf_types["w"] == "BF16"
    assert source.metas()["w"] == TensorMeta((4, 8), torch.bfloat16)
    assert torch.equal(source.load("w"), values)


def test_big_endian_file(tmp_path: Path) -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = _write_with_gguf(
        tmp_path / "be.gguf", [("w", values, None)], endianess=gguf.GGUFEndian.BIG
    )
    source = GGUFSource(path)
    assert source.byte_order == "big"
    assert source.fields["llama.block_count"] == 2
    assert np.array_equal(source.load("w").numpy(), values)
    assert source.raw_span("w") is None  # stored bytes are not little-endian


def test_opening_reads_no_tensor_data(plain_gguf, monkeypatch) -> None:
    path, _ = plain_gguf
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a, **k: pytest.fail("dequantized while opening"))
    source = GGUFSource(path)
    assert not source._maps  # the data maps are created by the first load
    source.close()


# -- broken files ------------------------------------------------------------------------------------


def _expect_source_error(path: Path, *fragments: str) -> SourceError:
    with pytest.raises(SourceError) as info:
        GGUFSource(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_bad_magic(tmp_path: Path, plain_gguf) -> None:
    path, _ = plain_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + path.read_bytes()[4:])
    _expect_source_error(bad, "not a GGUF file")


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_source_error(empty, "too short")
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGUF\x03\x00\x00\x00")
    _expect_source_error(tiny, "too short")


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.95])
def test_truncated_file(tmp_path: Path, plain_gguf, keep: float) -> None:
    path, _ = plain_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    _expect_source_error(cut, "truncated?")


def test_header_cut_in_the_middle_of_the_vocabulary(tmp_path: Path, plain_gguf) -> None:
    path, _ = plain_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: data.index(b"h\xc3\xa9llo") + 2])
    _expect_source_error(cut, "cut short", "tokenizer.ggml.tokens")


def test_absurd_counts(tmp_path: Path, plain_gguf) -> None:
    path, _ = plain_gguf
    data = bytearray(path.read_bytes())
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(bytes(data[:8]) + struct.pack("<Q", 2**60) + bytes(data[16:]))
    _expect_source_error(lying, "claims", "tensors")
    lying.write_bytes(bytes(data[:16]) + struct.pack("<Q", 2**62) + bytes(data[24:]))
    _expect_source_error(lying, "claims", "key-value")
    # an array length that runs past the end of the file
    at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4
    assert struct.unpack_from("<Q", data, at)[0] == 4
    data[at : at + 8] = struct.pack("<Q", 10**12)
    lying.write_bytes(bytes(data))
    _expect_source_error(lying, "tokenizer.ggml.tokens", "claims")


def test_tensor_offset_past_the_end(tmp_path: Path, plain_gguf) -> None:
    path, _ = plain_gguf
    source = GGUFSource(path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.long"
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    data[offset_at : offset_at + 8] = struct.pack("<Q", 1 << 40)
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(bytes(data))
    _expect_source_error(lying, "'blk.0.long'", "truncated?")
    # a misaligned offset, and one that overlaps its neighbour
    real = source.raw_span("blk.0.long").offset - source.data_offset
    data[offset_at : offset_at + 8] = struct.pack("<Q", real + 3)
    lying.write_bytes(bytes(data))
    _expect_source_error(lying, "alignment")
    data[offset_at : offset_at + 8] = struct.pack("<Q", 0)
    lying.write_bytes(bytes(data))
    _expect_source_error(lying, "overlap")


def test_unknown_tensor_type_and_version(tmp_path: Path, plain_gguf) -> None:
    path, _ = plain_gguf
    data = bytearray(path.read_bytes())
    name = b"blk.0.ids"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = struct.pack("<I", 4)  # Q4_2: removed from ggml long ago
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    _expect_source_error(bad, "'blk.0.ids'", "unknown GGML type 4")
    bad.write_bytes(path.read_bytes()[:4] + struct.pack("<I", 7) + path.read_bytes()[8:])
    _expect_source_error(bad, "version 7")


def test_missing_key(plain_gguf) -> None:
    path, _ = plain_gguf
    with pytest.raises(SourceError, match="no tensor named 'nope'"):
        GGUFSource(path).load("nope")


# -- our writer ---------------------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "token_embd.weight": torch.randn(32, 16, generator=g),
        "blk.0.attn_q.weight": torch.randn(16, 16, generator=g).half(),
        "blk.0.attn_k.weight": torch.randn(8, 16, generator=g).bfloat16(),
        "blk.0.conv": torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64),
        "blk.0.ids": torch.arange(-4, 4, dtype=torch.int8),
        "blk.0.i16": torch.arange(6, dtype=torch.int16),
        "blk.0.i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "positions": torch.arange(9),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(6, 4, generator=g)[:, 1:3],  # non-contiguous input
    }


def _write(path: Path, state: dict[str, torch.Tensor], **kw) -> list[Path]:
    writer = GGUFWriter(path, **kw)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    for key, value in state.items():
        writer.write(key, value)
    return writer.finish()


def test_writer_round_trip_bit_exact(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "out.gguf"
    assert GGUFWriter.for_target(path) and not GGUFWriter.for_target(tmp_path / "out.pt")
    assert _write(path, state, metadata={"general.name": "tiny", "note": ""}) == [path]

    source = GGUFSource(path)
    assert list(source.metas()) == list(state)
    assert source.metadata["general.architecture"] == "statebridge"
    assert source.metadata["general.name"] == "tiny" and source.metadata["note"] == ""
    for key, value in state.items():
        loaded = source.load(key)
        assert loaded.dtype == value.dtype and loaded.shape == value.shape, key
        assert torch.equal(loaded, value), key

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "statebridge"
    by_name = {t.name: t for t in reader.tensors}
    for key, value in state.items():
        t = by_name[key]
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == tuple(value.shape)
        raw = value.contiguous().view(torch.int16) if value.dtype == torch.bfloat16 else value.contiguous()
        assert np.asarray(t.data).tobytes() == raw.numpy().tobytes(), key
        assert t.data_offset % 32 == 0


def test_writer_is_deterministic_whatever_the_arrival_order(tmp_path: Path) -> None:
    state = _state()
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    _write(a, state, metadata={"general.name": "x"})
    _write(b, state, metadata={"general.name": "x"})
    assert a.read_bytes() == b.read_bytes()

    writer = GGUFWriter(c, metadata={"general.name": "x"})
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    assert c.stat().st_size > 0  # the header is on disk before any tensor arrives
    for key in reversed(list(state)):
        writer.write(key, state[key])
    writer.finish()
    assert c.read_bytes() == a.read_bytes()


def test_writer_output_equals_gguf_writer_output(tmp_path: Path) -> None:
    """Byte for byte what llama.cpp's own writer produces when it holds everything in memory."""
    state = {k: v.contiguous() for k, v in _state().items()}
    ours = tmp_path / "ours.gguf"
    _write(ours, state, metadata={"general.name": "tiny"})
    reference = gguf.GGUFWriter(tmp_path / "ref.gguf", "statebridge")
    reference.add_string("general.name", "tiny")
    for key, value in state.items():
        if value.dtype == torch.bfloat16:
            reference.add_tensor(key, value.view(torch.int16).numpy(), raw_dtype=Q.BF16)
        else:
            reference.add_tensor(key, value.numpy())
    reference.write_header_to_file()
    reference.write_kv_data_to_file()
    reference.write_tensors_to_file()
    reference.close()
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_writer_contract_errors(tmp_path: Path) -> None:
    state = _state()
    writer = GGUFWriter(tmp_path / "c.gguf")
    with pytest.raises(ExecutionError, match="before begin"):
        writer.write("positions", state["positions"])
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    writer.write("token_embd.weight", state["token_embd.weight"])
    with pytest.raises(ExecutionError, match="twice"):
        writer.write("token_embd.weight", state["token_embd.weight"])
    with pytest.raises(ExecutionError, match="not announced"):
        writer.write("nope", state["positions"])
    with pytest.raises(ExecutionError, match="announced"):
        writer.write("blk.0.attn_q.weight", state["blk.0.attn_q.weight"].float())
    with pytest.raises(ExecutionError, match="never written"):
        writer.finish()
    writer.abort()
    writer.abort()


def test_writer_architecture_alignment_and_typed_fields(tmp_path: Path, plain_gguf) -> None:
    src_path, _ = plain_gguf
    src = GGUFSource(src_path)
    path = tmp_path / "typed.gguf"
    _write(
        path,
        {"w": torch.ones(3)},
        metadata={"general.architecture": "llama", "general.alignment": "64"},
        fields={**src.typed_fields, "custom.count": 7, "custom.list": [1.5, 2.5]},
    )
    out = GGUFSource(path)
    assert out.alignment == 64
    assert out.metadata["general.architecture"] == "llama"
    for key, field in src.typed_fields.items():
        assert out.typed_fields[key] == field, key
    assert out.typed_fields["custom.count"] == GGUFField(7, GGUFValueType.INT32)
    assert out.fields["custom.list"] == [1.5, 2.5]
    assert gguf.GGUFReader(path).fields["general.alignment"].contents() == 64


def test_writer_refuses_what_gguf_cannot_store(tmp_path: Path) -> None:
    for meta in (TensorMeta((3,), torch.bool), TensorMeta((3,), torch.uint8), TensorMeta((2,), torch.float8_e4m3fn)):
        with pytest.raises(ConfigError, match=r"'bad'.*GGUF has no"):
            GGUFWriter(tmp_path / "x.gguf").begin({"ok": TensorMeta((1,), torch.float32), "bad": meta})
    with pytest.raises(ConfigError, match=r"'conv3d'.*at most 4"):
        GGUFWriter(tmp_path / "x.gguf").begin({"conv3d": TensorMeta((1, 2, 3, 4, 5), torch.float32)})
    with pytest.raises(ConfigError, match="general.alignment"):
        GGUFWriter(tmp_path / "x.gguf", metadata={"general.alignment": "48"}).begin({})


def test_writer_write_raw_copies_bytes(tmp_path: Path, plain_gguf) -> None:
    src_path, arrays = plain_gguf
    src = GGUFSource(src_path)
    path = tmp_path / "raw.gguf"
    writer = GGUFWriter(path)
    writer.begin(dict(src.metas()))
    for key in src.metas():
        assert writer.write_raw(key, [src.raw_span(key)])
    writer.finish()
    out = GGUFSource(path)
    for key, array in arrays.items():
        assert np.array_equal(out.load(key).numpy(), array)
    # the same bytes as decoding and writing each tensor
    _write(tmp_path / "decoded.gguf", {k: src.load(k) for k in src.metas()})
    assert (tmp_path / "decoded.gguf").read_bytes() == path.read_bytes()


# -- the real Gemma 3 270M (Q4_K_M) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> GGUFSource:
    return GGUFSource(gemma_path)


def test_gemma_header(gemma: GGUFSource, gemma_path: Path) -> None:
    assert len(gemma) == 236
    counts: dict[str, int] = {}
    for name in gemma.gguf_types.values():
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    md = gemma.metadata
    assert md["general.architecture"] == "gemma3"
    assert md["gemma3.block_count"] == "18"
    assert md["gemma3.embedding_length"] == "640"
    assert md["gemma3.attention.layer_norm_rms_epsilon"] == "1e-06"
    assert md["tokenizer.ggml.tokens"] == "[262144 items]"
    assert len(gemma.fields["tokenizer.ggml.tokens"]) == 262144
    assert gemma.fields["general.tags"] == ["gemma3", "gemma", "google", "text-generation"]
    metas = gemma.metas()
    assert metas["token_embd.weight"] == TensorMeta((262144, 640), torch.float32, "Q8_0")
    assert metas["blk.0.attn_q.weight"].shape == (1024, 640)
    assert metas["blk.0.attn_k.weight"].shape == (256, 640)
    assert metas["blk.0.ffn_down.weight"].shape == (640, 2048)
    assert metas["blk.17.ffn_up.weight"].shape == (2048, 640)
    assert metas["output_norm.weight"] == TensorMeta((640,), torch.float32)

    # Layout, checked independently of the reader's own checks: tensors tile the data section in
    # order, each at an aligned offset right after its predecessor, and the last one ends the file.
    end = gemma.data_offset
    for key in metas:
        qtype = Q[gemma.gguf_types[key]]
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(metas[key].shape) // block * size
        offset = _offset(gemma, key)
        assert offset == -(-end // gemma.alignment) * gemma.alignment, key
        end = offset + nbytes
    assert gemma_path.stat().st_size - end < gemma.alignment


def _offset(source: GGUFSource, key: str) -> int:
    return source._tensors[key].offset


@pytest.mark.parametrize(
    "key",
    [
        "output_norm.weight",  # F32
        "blk.0.attn_k.weight",  # Q5_0
        "blk.0.attn_output.weight",  # Q4_K
        "blk.0.attn_v.weight",  # Q8_0
        "blk.0.ffn_down.weight",  # Q6_K
    ],
)
def test_gemma_tensors_match_gguf_dequantize(gemma: GGUFSource, gemma_path: Path, key: str) -> None:
    meta = gemma.metas()[key]
    qtype = Q[gemma.gguf_types[key]]
    tensor = gemma.load(key)
    assert TensorMeta.of(tensor) == TensorMeta(meta.shape, meta.dtype) and (meta.stored or "F32") == qtype.name
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    assert 1e-4 < tensor.float().std().item() < 100
    # the stored bytes, read with numpy alone, decoded by gguf's reference kernels
    byte_shape = quant_shape_to_byte_shape(meta.shape, qtype) if qtype not in PLAIN else None
    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(meta.shape) // block * size
    raw = np.fromfile(gemma_path, dtype=np.uint8, count=nbytes, offset=_offset(gemma, key))
    if byte_shape is None:
        expected = raw.view(np.float32).reshape(meta.shape)
    else:
        expected = gguf.quants.dequantize(raw.reshape(byte_shape), qtype)
    assert np.array_equal(tensor.numpy(), expected)


def test_gemma_fields_and_raw_tensors_round_trip_through_our_writer(gemma: GGUFSource, tmp_path: Path) -> None:
    plain = [k for k in gemma.metas() if not gemma.is_quantized(k)][:20]
    path = tmp_path / "gemma-subset.gguf"
    writer = GGUFWriter(path, fields=gemma.typed_fields)
    writer.begin({k: gemma.metas()[k] for k in plain})
    for i, key in enumerate(plain):
        if i % 2:
            assert writer.write_raw(key, [gemma.raw_span(key)])
        else:
            writer.write(key, gemma.load(key))
    writer.finish()
    out = GGUFSource(path)
    assert out.typed_fields == gemma.typed_fields
    for key in plain:
        assert torch.equal(out.load(key), gemma.load(key)), key


def test_gemma_rename_stays_under_100_mb_without_torch(gemma_path: Path, tmp_path: Path) -> None:
    """Issue 14's bound: the rename never holds a tensor, nor the 262,144-token vocabulary as Python strings."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_torch_free import run_cli

    config = tmp_path / "rename.yaml"
    config.write_text(
        f"source: {gemma_path}\ntarget: {tmp_path / 'out.gguf'}\nsteps:\n"
        "  - rename: {mapping: {output_norm.weight: final_norm.weight}}\n"
    )
    modules, peak = run_cli("run", str(config), "--no-progress")
    assert "torch" not in modules
    assert peak < 100 * 1024**2
    out = GGUFSource(tmp_path / "out.gguf")
    assert out.gguf_types["final_norm.weight"] == "F32" and len(out) == 236
