"""The GGUF reader's exact line for each malformed header, its limits at their boundaries, split sets, and metadata text.

Written against the mutants of ``readers/gguf.py`` that the suite let live (docs/testing.md):
the older tests look for a word or two of each message; these build headers byte by
byte (``_gguf`` below, the layout gguf.GGUFWriter writes) and compare whole lines, with
each count, offset and position in them, on both sides of every limit.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from statebridge.errors import SourceError
from statebridge.readers.gguf import GGUFField, GGUFSource, _field_to_string, open_gguf, split_names, split_path
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.gguf import GGUFWriter
from statebridge.testing import mapped_file


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def info(name: str, ne: list[int], qtype: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)


def _gguf(kvs: list[bytes], infos: list[bytes] = (), data: bytes = b"", *, alignment: int = 32, version: int = 3,
          n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % alignment) + data


def _error(path: Path, data: bytes | None = None) -> str:
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(SourceError) as e:
        open_gguf(path)
    text = str(e.value)
    assert text.startswith(f"{path}: "), text
    return text[len(f"{path}: ") :]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "m.gguf"


def test_the_file_itself_too_short_wrong_magic_or_version(path: Path) -> None:
    assert _error(path, b"") == "file is 0 bytes, too short to be GGUF (truncated?)"
    assert _error(path, b"GGU") == "file is 3 bytes, too short to be GGUF (truncated?)"
    assert _error(path, b"GGML" + bytes(40)) == "not a GGUF file: starts with b'GGML', expected b'GGUF'"
    assert _error(path, b"GGUF" + bytes(19)) == "file is 23 bytes, too short for a GGUF header (truncated?)"
    assert _error(path, _gguf([], version=1)) == "GGUF version 1 is not supported (it predates 64-bit counts); reconvert the model"
    assert _error(path, _gguf([], version=4)) == "unsupported GGUF version 4 (this reader knows versions 2 and 3)"
    assert _error(path, _gguf([], version=0)) == "unsupported GGUF version 0 (this reader knows versions 2 and 3)"
    # version 1 written big-endian: its low half is zero, so the rest is read big-endian
    assert _error(path, _gguf([], version=1 << 24)) == "GGUF version 1 is not supported (it predates 64-bit counts); reconvert the model"
    assert _error(path, _gguf([], version=5 << 24)) == "unsupported GGUF version 5 (this reader knows versions 2 and 3)"
    path.write_bytes(b"GGUF" + bytes(20))  # 24 bytes: a header of version 0 is still read
    assert _error(path) == "unsupported GGUF version 0 (this reader knows versions 2 and 3)"
    for version in (2, 3):
        path.write_bytes(_gguf([u32("a", 1)], version=version))
        source = open_gguf(path)
        assert source.version == version and source.byte_order == "little" and source.fields["a"] == 1


def test_counts_the_file_cannot_hold_are_refused_at_their_limits(path: Path) -> None:
    size = 24 + 13 * 3
    data = _gguf([], n_kv=4) + bytes(13 * 3)
    assert len(data) == size + 8  # padding to 32
    data = data[:size]
    assert _error(path, data) == f"header claims 4 key-value fields, more than a {size}-byte file can hold (corrupt or truncated)"
    assert _error(path, data[:-1] + b"\x00"[:0]) == f"header claims 4 key-value fields, more than a {size - 1}-byte file can hold (corrupt or truncated)"
    # 3 fit the bytes: read, and the first name is empty-length zero... then its type is cut short
    exact = b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + bytes(39)
    assert _error(path, exact).startswith("key-value field '' appears twice")
    tensors = b"GGUF" + struct.pack("<IQQ", 3, 3, 0) + bytes(24 * 2)
    assert _error(path, tensors) == f"header claims 3 tensors, more than a {len(tensors)}-byte file can hold (corrupt or truncated)"
    tensors = b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + bytes(24 * 2)
    assert _error(path, tensors) == "tensor '' appears twice in the header"


def test_key_values_that_lie(path: Path) -> None:
    assert _error(path, _gguf([u32("a", 1), u32("a", 2)])) == "key-value field 'a' appears twice"
    assert _error(path, _gguf([kv("a", 99, bytes(8))])) == "field 'a' has unknown value type 99"
    assert _error(path, _gguf([kv(b"\xffab", V.UINT8, b"\x01")])) == "the name of key-value field #0 b'\\xffab' is not valid UTF-8"
    long_name = b"\xff" + b"x" * 100
    assert _error(path, _gguf([u32("ok", 1), kv(long_name, V.UINT8, b"\x01")])) == (
        f"the name of key-value field #1 {long_name[:60]!r} is not valid UTF-8"
    )
    cut = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 50) + b"abc" + bytes(2)
    assert _error(path, cut) == (
        f"header is cut short reading the name of key-value field #0 (50 bytes) at byte 32 (needs 50 bytes, file has {len(cut)}; truncated?)"
    )
    cut = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("a") + struct.pack("<I", V.UINT64) + b"\x01\x02\x03\x04"
    assert _error(path, cut) == f"header is cut short reading field 'a' at byte 37 (needs 8 bytes, file has {len(cut)}; truncated?)"
    cut = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("abcd") + b"\x01\x02"
    assert _error(path, cut) == f"header is cut short reading the value type of field 'abcd' at byte 36 (needs 4 bytes, file has {len(cut)}; truncated?)"


def _array(sub: int, count: int, items: bytes) -> bytes:
    return struct.pack("<IQ", sub, count) + items


def test_arrays_that_lie(path: Path) -> None:
    claim = _gguf([kv("a", V.ARRAY, _array(V.UINT32, 10**6, b""))])
    assert _error(path, claim) == "field 'a' claims 1000000 UINT32 items, more than the rest of the file can hold (truncated?)"
    # the limit: 4 items of 4 bytes in the 16 bytes left fit the count check
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("a", V.ARRAY, _array(V.UINT32, 4, bytes(16)))
    path.write_bytes(data)
    assert open_gguf(path).fields["a"] == [0, 0, 0, 0]
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("a", V.ARRAY, _array(V.UINT32, 5, bytes(16)))
    assert _error(path, data) == "field 'a' claims 5 UINT32 items, more than the rest of the file can hold (truncated?)"
    strings = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("v", V.ARRAY, _array(V.STRING, 2, _s("ab") + struct.pack("<Q", 9) + b"cd"))
    assert _error(path, strings) == (
        f"header is cut short reading field 'v' (9 bytes) at byte {len(strings) - 2} (needs 9 bytes, file has {len(strings)}; truncated?)"
    )
    strings = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("v", V.ARRAY, _array(V.STRING, 2, _s("abcdefgh") + b"\x01\x02\x03\x04"))
    assert _error(path, strings) == (
        f"header is cut short reading the length of field 'v' at byte {len(strings) - 4} (needs 8 bytes, file has {len(strings)}; truncated?)"
    )
    unknown = _gguf([kv("a", V.ARRAY, _array(77, 1, bytes(8)))])
    assert _error(path, unknown) == "the elements of field 'a' has unknown value type 77"


def _nested(depth: int) -> bytes:
    payload = _array(V.UINT8, 1, b"\x07")
    for _ in range(depth - 1):
        payload = _array(V.ARRAY, 1, payload)
    return payload


def test_arrays_nest_at_most_four_deep(path: Path) -> None:
    path.write_bytes(_gguf([kv("a", V.ARRAY, _nested(4))]))
    assert open_gguf(path).fields["a"] == [[[[7]]]]
    assert open_gguf(path).typed_fields["a"].sub_type == V.ARRAY
    assert _error(path, _gguf([kv("a", V.ARRAY, _nested(5))])) == "field 'a': arrays nested more than 4 deep"


def test_every_value_type_reads_back_with_its_type(path: Path) -> None:
    ref = gguf.GGUFWriter(path, "llama")
    ref.add_uint8("u8", 200)
    ref.add_int8("i8", -100)
    ref.add_uint16("u16", 60000)
    ref.add_int16("i16", -30000)
    ref.add_uint32("u32", 4_000_000_000)
    ref.add_int32("i32", -2_000_000_000)
    ref.add_float32("f32", 0.1)
    ref.add_uint64("u64", 2**63 + 5)
    ref.add_int64("i64", -(2**62))
    ref.add_float64("f64", 0.1)
    ref.add_bool("t", True)
    ref.add_bool("f", False)
    ref.add_string("s", "héllo")
    ref.add_array("bools", [True, False])
    ref.add_array("ints", [1, -2])
    ref.add_key_value("u16s", [1, 65535], V.ARRAY, V.UINT16)
    ref.add_array("floats", [0.1, 1.5])
    ref.add_array("strs", ["a", "é"])
    ref.add_key_value("raw", [b"\xff\xfe", b"ok"], V.ARRAY, V.STRING)
    ref.add_key_value("nested", [[1, 2], [3]], V.ARRAY, V.ARRAY)
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.close()
    source = open_gguf(path)
    typed = {k: (f.value, f.type, f.sub_type) for k, f in source.typed_fields.items()}
    f32 = float(np.float32(0.1))
    assert typed == {
        "general.architecture": ("llama", V.STRING, None),
        "u8": (200, V.UINT8, None), "i8": (-100, V.INT8, None), "u16": (60000, V.UINT16, None), "i16": (-30000, V.INT16, None),
        "u32": (4_000_000_000, V.UINT32, None), "i32": (-2_000_000_000, V.INT32, None), "f32": (f32, V.FLOAT32, None),
        "u64": (2**63 + 5, V.UINT64, None), "i64": (-(2**62), V.INT64, None), "f64": (0.1, V.FLOAT64, None),
        "t": (True, V.BOOL, None), "f": (False, V.BOOL, None), "s": ("héllo", V.STRING, None),
        "bools": ([True, False], V.ARRAY, V.BOOL), "ints": ([1, -2], V.ARRAY, V.INT32), "u16s": ([1, 65535], V.ARRAY, V.UINT16),
        "floats": ([f32, 1.5], V.ARRAY, V.FLOAT32), "strs": (["a", "é"], V.ARRAY, V.STRING),
        "raw": ([b"\xff\xfe", "ok"], V.ARRAY, V.STRING), "nested": ([[1, 2], [3]], V.ARRAY, V.ARRAY),
    }
    assert type(source.fields["t"]) is bool and [type(b) for b in source.fields["bools"]] == [bool, bool]
    assert source.typed_fields["strs"].count == 2 and source.typed_fields["s"].count is None
    assert source.metadata == {
        "general.architecture": "llama",
        "u8": "200", "i8": "-100", "u16": "60000", "i16": "-30000", "u32": "4000000000", "i32": "-2000000000", "f32": "0.1",
        "u64": str(2**63 + 5), "i64": str(-(2**62)), "f64": "0.1", "t": "True", "f": "False", "s": "héllo",
        "bools": "[true, false]", "ints": "[1, -2]", "u16s": "[1, 65535]", "floats": "[0.1, 1.5]", "strs": '["a", "é"]',
        "raw": '["\ufffd\ufffd", "ok"]', "nested": "[[1, 2], [3]]",
    }
    assert len(source.fields) == len(typed) and list(source.fields) == list(typed)


def test_metadata_text_of_long_arrays_and_odd_values() -> None:
    assert _field_to_string(GGUFField(list(range(256)), V.ARRAY, V.INT32)) == str(list(range(256)))
    assert _field_to_string(GGUFField(list(range(257)), V.ARRAY, V.INT32)) == "[257 items]"
    fits = ["x" * 16_380]
    assert _field_to_string(GGUFField(fits, V.ARRAY, V.STRING)) == f'["{fits[0]}"]'  # 16,384 characters
    too_long = ["x" * 16_381]
    assert _field_to_string(GGUFField(too_long, V.ARRAY, V.STRING)) == "[1 items]"
    assert _field_to_string(GGUFField(b"\xffa", V.STRING)) == "\ufffda"
    assert _field_to_string(GGUFField([float("inf"), 0.1], V.ARRAY, V.FLOAT32)) == "[Infinity, 0.1]"
    assert _field_to_string(GGUFField([0.1], V.ARRAY, V.FLOAT64)) == "[0.1]"
    assert _field_to_string(GGUFField([float(np.float32(0.1))], V.ARRAY, V.FLOAT64)) == f"[{float(np.float32(0.1))}]"
    assert _field_to_string(GGUFField([[b"\xff"], [float(np.float32(0.1))]], V.ARRAY, V.ARRAY)) == f'[["\ufffd"], [{float(np.float32(0.1))}]]'
    assert _field_to_string(GGUFField(float(np.float32(0.1)), V.FLOAT32)) == "0.1"
    assert _field_to_string(GGUFField(0.1, V.FLOAT64)) == "0.1"


def test_alignment_fields_that_lie(path: Path) -> None:
    assert _error(path, _gguf([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))])) == (
        "general.alignment has type UINT64, expected UINT32"
    )
    for bad in (0, 48, 3):
        assert _error(path, _gguf([u32("general.alignment", bad)])) == f"general.alignment is {bad}, not a power of two"
    path.write_bytes(_gguf([u32("general.alignment", 1)], alignment=1))
    assert open_gguf(path).alignment == 1
    data = _gguf([u32("general.alignment", 64)], [info("w", [4], Q.F32, 0)], alignment=64) + np.arange(4, dtype=np.float32).tobytes()
    path.write_bytes(data)
    source = open_gguf(path)
    assert source.alignment == 64 and source.data_offset == 128
    assert torch.equal(source.load("w"), torch.arange(4, dtype=torch.float32))


def _f32(values: list[float]) -> bytes:
    return np.array(values, dtype=np.float32).tobytes()


def test_tensor_infos_that_lie(path: Path) -> None:
    one = [info("w", [4], Q.F32, 0)]
    assert _error(path, _gguf([], one + one, _f32([1, 2, 3, 4]))) == "tensor 'w' appears twice in the header"
    assert _error(path, _gguf([], [info("w", [1] * 9, Q.F32, 0)], _f32([1]))) == "tensor 'w' claims 9 dimensions (at most 8 are plausible)"
    path.write_bytes(_gguf([], [info("w", [1] * 8, Q.F32, 0)], _f32([5])))
    assert open_gguf(path).metas()["w"] == TensorMeta((1,) * 8, torch.float32)
    assert _error(path, _gguf([], [info("w", [4], 4, 0)], _f32([1, 2, 3, 4]))) == "tensor 'w' has unknown GGML type 4"
    assert _error(path, _gguf([], [info("w", [16], Q.Q8_0, 0)], bytes(34))) == (
        "tensor 'w': row length 16 is not a multiple of the Q8_0 block size 32"
    )
    assert _error(path, _gguf([], [info("w", [4], Q.F32, 16)], bytes(64))) == (
        "tensor 'w': data offset 16 is not a multiple of the alignment 32"
    )
    short = _gguf([], one, _f32([1, 2, 3]))
    assert _error(path, short) == f"tensor 'w': data ends at byte {len(short) + 4} but the file has {len(short)} bytes (truncated?)"
    path.write_bytes(short + b"\x00\x00\x80\x40")  # exactly long enough
    assert torch.equal(open_gguf(path).load("w"), torch.tensor([0.0, 0.0, 0.0, 4.0]) + torch.tensor([1.0, 2.0, 3.0, 0.0]))
    huge = _gguf([], [info("w", [2**31, 2**30], Q.F32, 0)], bytes(32))
    assert _error(path, huge).startswith("tensor 'w': data ends at byte")
    empty_huge = _gguf([], [info("w", [0, 2**62], Q.F32, 0)], b"")
    assert _error(path, empty_huge + bytes(32)) == f"tensor 'w': shape {[2**62, 0]} is too large for torch (its sizes overflow int64)"
    fits = _gguf([], [info("w", [0, 2**60], Q.F32, 0)], b"") + bytes(32)  # 4 * 2**60 = 2**62: still an int64
    path.write_bytes(fits)
    assert open_gguf(path).load("w").shape == (2**60, 0)
    # the data section starts past the end: only when there are tensors
    no_data = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info("e", [0], Q.F32, 0)
    assert _error(path, no_data) == f"the tensor data section would start at byte 64, past the end of the file (truncated?)"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + u32("a", 1))
    assert open_gguf(path).data_offset == 64 and dict(open_gguf(path).metas()) == {}


def test_overlaps_are_found_in_offset_order_and_empty_tensors_overlap_nothing(path: Path) -> None:
    infos = [info("b", [8], Q.F32, 32), info("a", [8], Q.F32, 0), info("c", [4], Q.F32, 64)]
    path.write_bytes(_gguf([], infos, _f32(list(range(20)))))
    source = open_gguf(path)
    assert list(source.metas()) == ["a", "b", "c"]  # in the order of their data
    assert torch.equal(source.load("b"), torch.arange(8, 16, dtype=torch.float32))
    infos = [info("a", [8], Q.F32, 0), info("b", [8], Q.F32, 0)]
    assert _error(path, _gguf([], infos, _f32(list(range(8))))) == "tensors 'a' and 'b' overlap in the data section"
    infos = [info("a", [16], Q.F32, 0), info("e", [0], Q.F32, 32), info("b", [8], Q.F32, 32)]
    assert _error(path, _gguf([], infos, _f32(list(range(24))))) == "tensors 'a' and 'b' overlap in the data section"
    infos = [info("a", [8], Q.F32, 0), info("e", [0], Q.F32, 0), info("f", [0, 3], Q.F32, 32), info("b", [8], Q.F32, 32)]
    path.write_bytes(_gguf([], infos, _f32(list(range(16)))))
    source = open_gguf(path)
    assert source.load("f").shape == (3, 0) and torch.equal(source.load("b"), torch.arange(8, 16, dtype=torch.float32))


def test_loading_plain_quantized_misaligned_and_big_endian_data(path: Path, tmp_path: Path) -> None:
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), Q.Q8_0)
    infos = [info("q", [32, 2], Q.Q8_0, 0), info("i", [3], Q.I16, 96), info("n", [0], Q.Q8_0, 96)]
    path.write_bytes(_gguf([u32("general.alignment", 2)], infos, q8.tobytes() + bytes(28) + np.array([1, -2, 3], dtype=np.int16).tobytes(), alignment=2))
    source = open_gguf(path)
    assert source.gguf_types == {"q": "Q8_0", "i": "I16", "n": "Q8_0"}
    assert source.metas()["q"] == TensorMeta((2, 32), torch.float32, stored="Q8_0")
    assert source.is_quantized("q") and not source.is_quantized("i")
    assert source.raw_span("q") is None and source.stored_span("q").length == 68
    assert source.raw_span("i") == source.stored_span("i") and source.raw_span("i").length == 6
    assert np.array_equal(source.load("q").numpy(), gguf.quants.dequantize(q8, Q.Q8_0))
    assert source.load("q").dtype == torch.float32 and source.load("q").shape == (2, 32)
    assert source.load("n").shape == (0,) and source.load("n").dtype == torch.float32
    loaded = source.load("i")
    assert (source.data_offset + 96) % 2 == 0 and torch.equal(loaded, torch.tensor([1, -2, 3], dtype=torch.int16))
    assert source.files() == [path] and source.parts == [path]
    # a tensor at an odd byte: loaded from a copy, the same values
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(_gguf([u32("general.alignment", 1)], [info("w", [2], Q.F32, 1)], b"\x00" + _f32([1.5, -2.5]), alignment=1))
    assert torch.equal(open_gguf(odd).load("w"), torch.tensor([1.5, -2.5]))
    with pytest.raises(SourceError) as e:
        source.load("nope")
    assert str(e.value) == f"{path}: no tensor named 'nope'"
    with pytest.raises(SourceError) as e:
        source.is_quantized("nope")
    assert str(e.value) == f"{path}: no tensor named 'nope'"


def _big_endian(path: Path, tensors: list[tuple[str, np.ndarray, Q | None]]) -> Path:
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_array("ids", [1, 2])
    writer.add_string("s", "x")
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_big_endian_files_load_swapped_and_refuse_to_dequantize(path: Path) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32), Q.Q8_0)
    # gguf writes big-endian files of plain types only (swapping them itself): "b" is written as the I16 bits of
    # bfloat16 values and "q" as 34 int8 bytes of one Q8_0 block, and their types (and q's row) are patched here
    _big_endian(path, [("w", w.copy(), None), ("b", b.view(torch.int16).numpy().copy(), None), ("q", q8.view(np.int8).reshape(34).copy(), None)])
    data = bytearray(path.read_bytes())
    for name, qtype, row in ((b"b", Q.BF16, 2), (b"q", Q.Q8_0, 32)):
        at = data.index(struct.pack(">Q", 1) + name) + 9
        assert struct.unpack_from(">I", data, at)[0] == 1  # one dimension
        data[at + 4 : at + 12] = struct.pack(">Q", row)
        data[at + 12 : at + 16] = struct.pack(">I", qtype)
    path.write_bytes(bytes(data))
    source = open_gguf(path)
    assert source.byte_order == "big" and source.fields["ids"] == [1, 2] and source.fields["s"] == "x"
    assert torch.equal(source.load("w"), torch.from_numpy(w))
    assert torch.equal(source.load("b"), b)
    assert source.metas()["q"] == TensorMeta((32,), torch.float32)  # no stored type: its blocks cannot be copied
    assert source.raw_span("w") is None and source.stored_span("w") is None
    with pytest.raises(SourceError) as e:
        source.load("q")
    assert str(e.value) == f"{path}: tensor 'q': Q8_0 data in a big-endian GGUF file cannot be dequantized"


def test_close_drops_the_maps_and_a_later_load_maps_again(path: Path) -> None:
    path.write_bytes(_gguf([], [info("w", [2], Q.F32, 0)], _f32([1, 2])))
    source = open_gguf(path)
    first = source.load("w")
    source.close()
    assert source._maps == {}
    assert torch.equal(source.load("w"), first)
    path.unlink()
    source.close()
    with pytest.raises(SourceError) as e:
        source.load("w")
    assert str(e.value).startswith(f"{path}: cannot read: ")


# -- split sets ------------------------------------------------------------------------------------


def _part(path: Path, no: int, count: int, total: int, tensors: dict[str, np.ndarray], fingerprint: str | None = "fp",
          keys: dict[str, tuple[object, V]] | None = None) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    default = {"split.no": (no, V.UINT16), "split.count": (count, V.UINT16), "split.tensors.count": (total, V.INT32)}
    for key, (value, vtype) in (default if keys is None else keys).items():
        writer.add_key_value(key, value, vtype)
    if fingerprint is not None:
        writer.add_string("statebridge.fingerprint", fingerprint)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _set(folder: Path, count: int = 3, overrides: dict[int, dict] | None = None) -> list[Path]:  # type: ignore[type-arg]
    overrides = overrides or {}
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        kw = overrides.get(i, {})
        tensors = kw.pop("tensors", {f"t{i}": np.full(4, i, dtype=np.float32)})
        paths.append(_part(folder / f"m-{i + 1:05d}-of-{count:05d}.gguf", i, count, kw.pop("total", count), tensors, **kw))
    return paths


def test_a_split_set_reads_as_one_source(tmp_path: Path) -> None:
    paths = _set(tmp_path / "s")
    source = open_gguf(paths[0])
    assert source.parts == paths and source.files() == paths
    assert list(source.metas()) == ["t0", "t1", "t2"]
    for i in range(3):
        assert torch.equal(source.load(f"t{i}"), torch.full((4,), float(i)))
        assert source.raw_span(f"t{i}").path == paths[i]
    assert source.fields["split.count"] == 3
    # one part: no set
    (single,) = _set(tmp_path / "one", count=1)
    assert open_gguf(single).parts == [single]


def test_split_sets_that_lie_are_one_line_naming_the_part(tmp_path: Path) -> None:
    paths = _set(tmp_path / "a")
    assert _error(paths[1]) == "is part 2 of 3 of a split GGUF, which holds its tensors only; open its first part, m-00001-of-00003.gguf"
    renamed = tmp_path / "a" / "renamed.gguf"
    renamed.write_bytes(paths[0].read_bytes())
    assert _error(renamed) == (
        "is part 1 of a 3-part split GGUF, but its name does not end in '-00001-of-00003.gguf', "
        "so its other parts cannot be found; give it back its llama.cpp name"
    )
    wrong_count = tmp_path / "a" / "m-00001-of-00004.gguf"
    wrong_count.write_bytes(paths[0].read_bytes())
    assert _error(wrong_count).startswith("is part 1 of a 3-part split GGUF, but its name does not end in '-00001-of-00003.gguf'")
    paths[2].unlink()
    with pytest.raises(SourceError) as e:
        open_gguf(paths[0])
    assert str(e.value) == f"{paths[2]}: is missing: it is part 3 of the 3-part split GGUF {paths[0].name}"

    b = _set(tmp_path / "b", overrides={1: {"fingerprint": "other"}})
    with pytest.raises(SourceError) as e:
        open_gguf(b[0])
    assert str(e.value) == f"{b[1]}: belongs to another model than {b[0].name}: its statebridge.fingerprint differs"
    c = _set(tmp_path / "c", overrides={1: {"fingerprint": None}})
    assert list(open_gguf(c[0]).metas()) == ["t0", "t1", "t2"]  # no fingerprint: nothing to compare
    d = _set(tmp_path / "d", overrides={2: {"total": 4}})
    with pytest.raises(SourceError) as e:
        open_gguf(d[0])
    assert str(e.value) == (
        f"{d[2]}: is not part 3 of 3 of {d[0].name}: its split keys say part 3 of 3, 4 tensors in all where part 3 of 3, 3 tensors in all was expected"
    )
    e_ = _set(tmp_path / "e", overrides={1: {"keys": {}}})
    with pytest.raises(SourceError) as e:
        open_gguf(e_[0])
    assert str(e.value) == (
        f"{e_[1]}: is not part 2 of 3 of {e_[0].name}: its split keys say nothing (no split keys) where part 2 of 3, 3 tensors in all was expected"
    )
    f = _set(tmp_path / "f", overrides={0: {"total": 4}, 1: {"total": 4}, 2: {"total": 4}})
    assert _error(f[0]) == "its 3 parts hold 3 tensors but split.tensors.count says 4: a part of another model?"


def test_split_keys_that_are_not_counts(tmp_path: Path) -> None:
    path = tmp_path / "m-00001-of-00002.gguf"
    keys = {"split.count": (2, V.UINT16), "split.tensors.count": (1, V.INT32)}
    _part(path, 0, 2, 1, {}, keys=keys)
    assert _error(path) == "has split.count but no split.no: a damaged split GGUF part"
    _part(path, 0, 2, 1, {}, keys={**keys, "split.no": ("0", V.STRING)})
    assert _error(path) == "split.no is '0' (STRING), not a count"
    _part(path, 0, 2, 1, {}, keys={"split.no": (0, V.UINT16), "split.count": (2, V.UINT16), "split.tensors.count": (-1, V.INT32)})
    assert _error(path) == "split.tensors.count is -1 (INT32), not a count"
    _part(path, 0, 2, 1, {}, keys={"split.no": (0, V.UINT16), "split.count": (2.0, V.FLOAT32), "split.tensors.count": (1, V.INT32)})
    assert _error(path) == "split.count is 2.0 (FLOAT32), not a count"
    _part(path, 0, 2, 1, {}, keys={"split.no": (2, V.UINT16), "split.count": (2, V.UINT16), "split.tensors.count": (1, V.INT32)})
    assert _error(path) == "split.no is 2 but split.count is only 2"
    _part(path, 0, 2, 1, {}, keys={"split.no": (0, V.UINT64), "split.count": (0, V.UINT8), "split.tensors.count": (0, V.UINT32)})
    assert list(open_gguf(path).metas()) == []  # a count of 0: no set


def test_split_names_as_llama_cpp_makes_them(tmp_path: Path) -> None:
    assert split_names(tmp_path / "m-00002-of-00003.gguf") == (tmp_path / "m", 3, 1)
    assert split_names(tmp_path / "a-b-00001-of-00001.gguf") == (tmp_path / "a-b", 1, 0)
    assert split_names(tmp_path / "m-00003-of-00003.gguf") == (tmp_path / "m", 3, 2)
    for name in ("m-00004-of-00003.gguf", "m-00000-of-00003.gguf", "m-0001-of-00003.gguf", "m-00001-of-00003.gguf.bak", "-00001-of-00003.gguf", "m.gguf"):
        assert split_names(tmp_path / name) is None, name
    assert split_path(tmp_path / "m", 0, 12) == tmp_path / "m-00001-of-00012.gguf"


def test_parts_of_another_byte_order_or_repeating_a_tensor(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    paths = _set(folder, count=2, overrides={1: {"tensors": {"t0": np.zeros(4, dtype=np.float32)}}})
    with pytest.raises(SourceError) as e:
        open_gguf(paths[0])
    assert str(e.value) == f"{paths[1]}: tensor 't0' is also in {paths[0].name}, an earlier part"
    paths = _set(tmp_path / "h", count=2)
    writer = gguf.GGUFWriter(paths[1], "llama", endianess=gguf.GGUFEndian.BIG)
    for key, value, vtype in (("split.no", 1, V.UINT16), ("split.count", 2, V.UINT16), ("split.tensors.count", 2, V.INT32)):
        writer.add_key_value(key, value, vtype)
    writer.add_string("statebridge.fingerprint", "fp")
    writer.add_tensor("t1", np.full(4, 1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError) as e:
        open_gguf(paths[0])
    assert str(e.value) == f"{paths[1]}: is big-endian but {paths[0].name} is little-endian"


def test_our_own_split_output_reads_back(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(3)}
    writer = GGUFWriter(tmp_path / "out", shard_size=32)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    for k, v in state.items():
        writer.write(k, v)
    files = writer.finish()
    source = open_gguf(files[0])
    assert source.parts == files and all(torch.equal(source.load(k), v) for k, v in state.items())
    assert sys.byteorder == "little"


def test_aligned_tensors_are_views_of_the_map_and_misaligned_ones_copies(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf([u32("general.alignment", 1)], [info("odd", [2], Q.F32, 1), info("even", [2], Q.F32, 12)],
                           b"\x00" + _f32([1.5, -2.5]) + bytes(3) + _f32([3.0, 4.0]), alignment=1))
    source = open_gguf(path)
    assert (source.data_offset + 12) % 4 == 0 and (source.data_offset + 1) % 4 != 0
    even, odd = source.load("even"), source.load("odd")
    assert torch.equal(even, torch.tensor([3.0, 4.0])) and torch.equal(odd, torch.tensor([1.5, -2.5]))
    assert mapped_file(even.data_ptr()) == str(path)
    assert mapped_file(odd.data_ptr()) != str(path)


def test_a_file_emptied_after_opening_cannot_be_mapped(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf([], [info("w", [2], Q.F32, 0)], _f32([1, 2])))
    source = open_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(SourceError) as e:
        source.load("w")
    assert str(e.value) == f"{path}: cannot map the file: cannot mmap an empty file"


def test_an_empty_data_section_holds_empty_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    data = _gguf([], [info("e", [0], Q.F32, 0)])
    path.write_bytes(data)
    source = open_gguf(path)
    assert source.data_offset == len(data) and source.load("e").shape == (0,)


def test_sizes_of_exactly_2_63_bytes_overflow_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    assert _error(path, _gguf([], [info("w", [0, 2**61], Q.F32, 0)]) + bytes(32)) == (
        f"tensor 'w': shape {[2**61, 0]} is too large for torch (its sizes overflow int64)"
    )


def test_a_type_gguf_cannot_dequantize_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf([], [info("q", [32], Q.Q8_1, 0)], bytes(40)))
    source = open_gguf(path)
    assert source.metas()["q"] == TensorMeta((32,), torch.float32, stored="Q8_1")
    with pytest.raises(SourceError) as e:
        source.load("q")
    assert str(e.value) == (
        f"{path}: tensor 'q': the installed gguf package cannot dequantize Q8_1 (upgrade gguf, or requantize the model with llama-quantize)"
    )


def test_empty_tensors_load_in_their_dtype_and_loads_share_one_map(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    infos = [info("e", [0, 2], Q.I32, 0), info("h", [0], Q.F16, 0), info("a", [4], Q.F32, 0), info("b", [4], Q.F32, 32)]
    path.write_bytes(_gguf([], infos, _f32([1, 2, 3, 4]) + bytes(16) + _f32([5, 6, 7, 8])))
    source = open_gguf(path)
    assert source.load("e").dtype == torch.int32 and source.load("e").shape == (2, 0)
    assert source.load("h").dtype == torch.float16
    a, b = source.load("a"), source.load("b")
    assert b.data_ptr() - a.data_ptr() == 32  # views of one map of the file
    assert len(source._maps) == 1


def test_fields_compare_by_type_and_value_and_show_lazy_arrays_without_decoding(tmp_path: Path) -> None:
    assert GGUFField(1, V.UINT8) != GGUFField(1, V.UINT16)
    assert GGUFField([1], V.ARRAY, V.INT32) != GGUFField([1], V.ARRAY, V.UINT32)
    assert GGUFField(1, V.UINT8) == GGUFField(1, V.UINT8) and GGUFField(1, V.UINT8) != GGUFField(2, V.UINT8)
    path = tmp_path / "m.gguf"
    # more than 256 items: the metadata text does not decode them, so the field is still lazy
    path.write_bytes(_gguf([kv("v", V.ARRAY, _array(V.STRING, 300, _s("a") * 300)), u32("n", 3)]))
    source = open_gguf(path)
    field = source.typed_fields["v"]
    assert source.metadata["v"] == "[300 items]"
    assert repr(field) == f"GGUFField(<300 STRING items>, {V.ARRAY!r}, {V.STRING!r})"
    assert field.value == ["a"] * 300
    assert repr(field) == f"GGUFField({['a'] * 300!r}, {V.ARRAY!r}, {V.STRING!r})"
    assert repr(open_gguf(path).typed_fields["n"]) == f"GGUFField(3, {V.UINT32!r}, None)"


def test_string_lengths_are_unsigned_and_a_vocabulary_may_end_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    exact = head + kv("v", V.ARRAY, _array(V.STRING, 2, _s("ab") + _s("cde")))
    path.write_bytes(exact)  # the last string's last byte is the file's
    assert open_gguf(path).fields["v"] == ["ab", "cde"]
    huge = head + kv("v", V.ARRAY, _array(V.STRING, 2, _s("ab") + struct.pack("<Q", 2**64 - 1) + b"cdefgh"))
    assert _error(path, huge) == (
        f"header is cut short reading field 'v' ({2**64 - 1} bytes) at byte {len(huge) - 6} (needs {2**64 - 1} bytes, file has {len(huge)}; truncated?)"
    )


def test_a_one_part_split_is_a_plain_file_and_a_set_counting_one_tensor_is_not(tmp_path: Path) -> None:
    plain = _part(tmp_path / "plain.gguf", 0, 1, 1, {"t": np.ones(4, dtype=np.float32)})
    assert open_gguf(plain).parts == [plain]  # split.count 1: whatever its name
    lying = _set(tmp_path / "s", overrides={i: {"total": 1} for i in range(3)})
    assert _error(lying[0]) == "its 3 parts hold 3 tensors but split.tensors.count says 1: a part of another model?"


def test_an_array_cut_in_its_count_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    cut = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("abc") + struct.pack("<II", V.ARRAY, V.UINT8) + b"\x01\x02"
    assert _error(path, cut) == f"header is cut short reading the length of field 'abc' at byte 43 (needs 8 bytes, file has {len(cut)}; truncated?)"


def test_more_exact_lines_for_cut_headers_versions_and_tensor_limits(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    head2 = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    cut = head2 + kv("a", V.STRING, _s("xxxxx")) + b"\x01\x02\x03\x04\x05\x06"
    assert _error(path, cut) == (
        f"header is cut short reading the length of the name of key-value field #1 at byte {len(cut) - 6} (needs 8 bytes, file has {len(cut)}; truncated?)"
    )
    cut = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("s", V.STRING, struct.pack("<Q", 50) + b"abcdef")
    assert _error(path, cut) == f"header is cut short reading field 's' (50 bytes) at byte {len(cut) - 6} (needs 50 bytes, file has {len(cut)}; truncated?)"
    assert _error(path, _gguf([], version=0x80000003)) == "unsupported GGUF version 2147483651 (this reader knows versions 2 and 3)"
    assert _error(path, _gguf([], [info("q", [], Q.Q8_0, 0)], bytes(34))) == (
        "tensor 'q': row length 1 is not a multiple of the Q8_0 block size 32"
    )
    later = _gguf([], [info("a", [4], Q.F32, 0), info("w", [4], Q.F32, 32)], _f32([1, 2, 3, 4]) + bytes(16) + _f32([1, 2]))
    assert _error(path, later) == f"tensor 'w': data ends at byte {len(later) + 8} but the file has {len(later)} bytes (truncated?)"
    assert _error(path, _gguf([], [info("d", [0, 2**60], Q.F64, 0)]) + bytes(32)) == (
        f"tensor 'd': shape {[2**60, 0]} is too large for torch (its sizes overflow int64)"
    )


def test_sources_are_named_by_their_path_and_arrays_keep_their_stored_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    items = _array(V.UINT16, 3, struct.pack("<3H", 1, 2, 3))
    path.write_bytes(_gguf([kv("v", V.ARRAY, items)]))
    source = open_gguf(path)
    assert source.name == str(path) and source.path == path
    assert source.typed_fields["v"].encoded == items and source.typed_fields["v"].count == 3
    big = tmp_path / "big.gguf"
    _big_endian(big, [])
    field = open_gguf(big).typed_fields["ids"]
    assert (field.value, field.type, field.sub_type, field.encoded) == ([1, 2], V.ARRAY, V.INT32, None)


def test_stored_arrays_with_other_bytes_differ(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(_gguf([kv("v", V.ARRAY, _array(V.UINT8, 300, bytes(300)))]))
    b.write_bytes(_gguf([kv("v", V.ARRAY, _array(V.UINT8, 300, bytes(299) + b"\x01"))]))
    fa, fb = open_gguf(a).typed_fields["v"], open_gguf(b).typed_fields["v"]
    assert fa != fb and fa == open_gguf(a).typed_fields["v"]


def test_a_tensor_name_that_is_not_utf8_is_named_by_its_place(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    bad = _s(b"\xffw") + struct.pack("<I1QIQ", 1, 4, Q.F32, 0)
    assert _error(path, _gguf([], [bad], _f32([1, 2, 3, 4]))) == "the name of tensor #0 b'\\xffw' is not valid UTF-8"


def test_big_endian_arrays_nest_four_deep_too(path: Path) -> None:
    # a big-endian file's arrays are decoded at once, not kept encoded: their depth still starts at the field
    payload = struct.pack(">IQ", V.UINT8, 1) + b"\x07"
    for _ in range(3):
        payload = struct.pack(">IQ", V.ARRAY, 1) + payload
    key = b"a"
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + struct.pack(">Q", len(key)) + key + struct.pack(">I", V.ARRAY) + payload)
    source = open_gguf(path)
    assert source.byte_order == "big" and source.fields["a"] == [[[[7]]]]


def test_a_tensor_info_cut_short_names_the_tensor_and_the_part(path: Path) -> None:
    name = "w" * 40  # long enough that the tensor count's minimum fits and each cut reaches its own read
    full = _gguf([], [info(name, [2, 3], 0, 0)])
    at = 24 + 8 + len(name)
    for cut, what, where, needs in ((at + 2, "dimension count", at, 4), (at + 7, "shape", at + 4, 8),
                                    (at + 22, "type", at + 20, 4), (at + 27, "data offset", at + 24, 8)):
        line = f"header is cut short reading the {what} of tensor {name!r} at byte {where} (needs {needs} bytes, file has {cut}; truncated?)"
        assert _error(path, full[:cut]) == line


def test_a_file_that_cannot_be_read_is_one_line() -> None:
    # /proc/self/mem opens as a regular file of size 0, but reading its first page (never mapped) is EIO
    with pytest.raises(SourceError) as e:
        open_gguf(Path("/proc/self/mem"))
    assert str(e.value) == "/proc/self/mem: cannot read: Input/output error"
