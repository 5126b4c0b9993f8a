"""The GGUF writer byte for byte against ``gguf.GGUFWriter``, its split parts, its exact errors, and what it does to files.

Written against the mutants of ``writers/gguf.py`` that the suite let live (docs/testing.md):
each value type and array kind encoded as the gguf library packs it, the order of the
key-values, the cut between split parts at its exact boundary, the keys of each part,
``general.file_type`` recomputed as llama.cpp guesses it, writeback ranges, fsync and
close of every part, and whole error lines.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import LlamaFileType as FT

import statebridge.writers.gguf as gguf_writer
from statebridge.errors import ConfigError, ExecutionError
from statebridge.readers.base import RawSpan
from statebridge.readers.gguf import GGUFField, GGUFSource, open_gguf
from statebridge.readers.safetensors import SafetensorsFile
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.gguf import GGUFWriter, _encode_value, _file_type

sys.path.insert(0, str(Path(__file__).parent))
from test_nothing_lost_readers import _gguf_with_fields  # noqa: E402


def _write(path: Path, state: dict[str, torch.Tensor], **kw) -> GGUFWriter:  # type: ignore[no-untyped-def]
    writer = GGUFWriter(path, **kw)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    for key, value in state.items():
        writer.write(key, value)
    writer.finish()
    return writer


def _message(error: type[Exception], call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as e:
        call()
    return str(e.value)


_LIB = gguf.GGUFWriter.__new__(gguf.GGUFWriter)  # only its packing, which needs the byte order
_LIB.endianess = gguf.GGUFEndian.LITTLE

VALUES = [
    (200, V.UINT8, None), (-100, V.INT8, None), (60000, V.UINT16, None), (-30000, V.INT16, None),
    (4_000_000_000, V.UINT32, None), (-2_000_000_000, V.INT32, None), (0.1, V.FLOAT32, None),
    (2**63 + 5, V.UINT64, None), (-(2**62), V.INT64, None), (0.1, V.FLOAT64, None),
    (True, V.BOOL, None), (False, V.BOOL, None), ("héllo", V.STRING, None), (b"\xff\xfe", V.STRING, None), ("", V.STRING, None),
    ([1, 2, 3], V.ARRAY, V.UINT16), ([1, -2], V.ARRAY, None), ([0.5, 1.5], V.ARRAY, None), ([0.5, 1.5], V.ARRAY, V.FLOAT64),
    ([True, False, True], V.ARRAY, None), (["a", "bé", ""], V.ARRAY, None), ([b"\x80", b"ok"], V.ARRAY, V.STRING),
    (b"\x01\x02\x03", V.ARRAY, None), ([[1, 2], [3]], V.ARRAY, V.ARRAY), ([["x"], ["y", "z"]], V.ARRAY, None),
    ([2**40, 1], V.ARRAY, V.INT64), ([True], V.ARRAY, V.BOOL),
]


@pytest.mark.parametrize("value, vtype, sub_type", VALUES, ids=lambda v: repr(v)[:20])
def test_each_value_is_encoded_as_the_gguf_library_packs_it(value, vtype, sub_type) -> None:  # type: ignore[no-untyped-def]
    assert _encode_value(value, vtype, sub_type) == _LIB._pack_val(value, vtype, add_vtype=False, sub_type=sub_type)


def test_values_the_library_refuses_are_refused_with_its_words() -> None:
    assert _message(ValueError, lambda: _encode_value(1, 99)) == "invalid GGUF value type 99"  # type: ignore[arg-type]
    assert _message(ValueError, lambda: _encode_value(5, V.ARRAY)) == "invalid GGUF metadata array, expecting a sequence"
    assert _message(ValueError, lambda: _encode_value([], V.ARRAY)) == "invalid GGUF metadata array: empty"
    assert _message(ValueError, lambda: _encode_value([1, "a"], V.ARRAY)) == "all items in a GGUF array should be of the same type"
    assert _message(ValueError, lambda: _encode_value([1, 1.5], V.ARRAY)) == "all items in a GGUF array should be of the same type"


def _reference(path: Path, arch: str, kv: list[tuple[str, object, V, V | None]], state: dict[str, torch.Tensor], alignment: int | None = None) -> bytes:
    """What gguf.GGUFWriter writes for these key-values (in this order) and tensors."""
    ref = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        ref.data_alignment = alignment
        ref.add_uint32("general.alignment", alignment)
    for key, value, vtype, sub_type in kv:
        ref.add_key_value(key, value, vtype, sub_type)
    for key, value in state.items():
        if value.dtype == torch.bfloat16:
            ref.add_tensor(key, value.view(torch.int16).numpy(), raw_dtype=Q.BF16)
        else:
            ref.add_tensor(key, value.numpy())
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()
    return path.read_bytes()


STATE = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.arange(5, dtype=torch.float16),
    "c": torch.arange(4, dtype=torch.bfloat16).reshape(1, 1, 2, 2),
    "d": torch.arange(3, dtype=torch.int64),
    "e": torch.zeros(0, 2),
}


def test_typed_fields_plain_values_and_strings_are_written_as_the_library_writes_them(tmp_path: Path) -> None:
    fields = {
        "custom.u8": GGUFField(7, V.UINT8),
        "custom.arr": GGUFField([1, 2], V.ARRAY, V.INT16),
        "custom.int": 5,
        "custom.big": 2**31,
        "custom.neg_big": -(2**31) - 1,
        "custom.edge": 2**31 - 1,
        "custom.low": -(2**31),
        "custom.float": 0.25,
        "custom.flag": True,
        "custom.list": ["x", "y"],
        "custom.ints": [3, 4],
    }
    ours = tmp_path / "ours.gguf"
    _write(ours, STATE, metadata={"general.name": "tiny", "note": 7}, fields=fields)  # type: ignore[dict-item]
    kv = [
        ("general.name", "tiny", V.STRING, None),
        ("note", "7", V.STRING, None),  # metadata strings: str() of the value
        ("custom.u8", 7, V.UINT8, None),
        ("custom.arr", [1, 2], V.ARRAY, V.INT16),
        ("custom.int", 5, V.INT32, None),
        ("custom.big", 2**31, V.INT64, None),
        ("custom.neg_big", -(2**31) - 1, V.INT64, None),
        ("custom.edge", 2**31 - 1, V.INT32, None),
        ("custom.low", -(2**31), V.INT32, None),
        ("custom.float", 0.25, V.FLOAT32, None),
        ("custom.flag", True, V.BOOL, None),
        ("custom.list", ["x", "y"], V.ARRAY, V.STRING),
        ("custom.ints", [3, 4], V.ARRAY, V.INT32),
    ]
    assert ours.read_bytes() == _reference(tmp_path / "ref.gguf", "statebridge", kv, STATE)


def test_architecture_and_alignment_come_first_and_the_alignment_is_a_uint32(tmp_path: Path) -> None:
    ours = tmp_path / "ours.gguf"
    fields = {"custom.x": "x", "general.alignment": 64, "general.architecture": "llama"}
    _write(ours, STATE, metadata={"general.name": "n"}, fields=fields)
    expected = _reference(tmp_path / "ref.gguf", "llama", [("general.name", "n", V.STRING, None), ("custom.x", "x", V.STRING, None)], STATE, alignment=64)
    assert ours.read_bytes() == expected
    source = GGUFSource(ours)
    assert source.alignment == 64 and source.data_offset % 64 == 0
    assert list(source.typed_fields)[:3] == ["general.architecture", "general.alignment", "general.name"]
    assert source.typed_fields["general.alignment"].type == V.UINT32
    # as a metadata string too
    _write(tmp_path / "s.gguf", STATE, metadata={"general.alignment": "64", "general.name": "n", "general.architecture": "llama"}, fields={"custom.x": "x"})
    assert (tmp_path / "s.gguf").read_bytes() == expected


def test_bad_alignments_and_values_are_one_line_naming_the_output(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    for bad in ("48", "0", "-64", "abc", str(2**32), GGUFField(3, V.UINT32), None):
        writer = GGUFWriter(path, fields={"general.alignment": bad})
        shown = repr(bad.value if isinstance(bad, GGUFField) else bad)
        if bad is None:
            continue
        assert _message(ConfigError, lambda: writer.begin({})) == (
            f"GGUF output {path}: bad general.alignment {shown}: must be a non-zero power of two"
        )
        assert _message(ConfigError, lambda: writer.layout({})) == (
            f"GGUF output {path}: bad general.alignment {shown}: must be a non-zero power of two"
        )
    assert GGUFWriter(path, fields={"general.alignment": 2**31}).layout({"a": TensorMeta((3,), torch.float32)})[0].nbytes == 12
    assert _message(ConfigError, lambda: GGUFWriter(path, fields={"custom.d": {"a": 1}}).begin({})) == (
        f"GGUF output {path}: metadata 'custom.d' is a dict; use str, int, float, bool or a list of one of them"
    )
    assert _message(ConfigError, lambda: GGUFWriter(path, fields={"custom.e": []}).begin({})) == (
        f"GGUF output {path}: metadata 'custom.e' is an empty array, which gguf cannot write"
    )
    assert _message(ConfigError, lambda: GGUFWriter(path, fields={"custom.e": GGUFField([], V.ARRAY, V.INT32)}).begin({})) == (
        f"GGUF output {path}: metadata 'custom.e' is an empty array, which gguf cannot write"
    )
    assert _message(ConfigError, lambda: GGUFWriter(path, fields={"custom.u": GGUFField(300, V.UINT8)}).begin({})) == (
        f"GGUF output {path}: cannot write the header: ubyte format requires 0 <= number <= 255"
    )
    assert _message(ConfigError, lambda: GGUFWriter(path, fields={"custom.m": [1, "a"]}).begin({})) == (
        f"GGUF output {path}: cannot write the header: all items in a GGUF array should be of the same type"
    )
    assert not path.exists()


def test_tensors_gguf_cannot_store_are_refused_naming_the_key(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "x.gguf")
    assert _message(ConfigError, lambda: writer.begin({"ok": TensorMeta((1,), torch.float32), "m": TensorMeta((3,), torch.bool)})) == (
        "cannot write 'm' to gguf: GGUF has no bool type; cast it to one of float32, float16, bfloat16, float64, int8, int16, int32, int64"
    )
    assert _message(ConfigError, lambda: writer.begin({"c": TensorMeta((1, 2, 3, 4, 5), torch.float32)})) == (
        "cannot write 'c' to gguf: its shape is [1, 2, 3, 4, 5], but ggml tensors have at most 4 dimensions; reshape it first"
    )
    writer.begin({"four": TensorMeta((1, 2, 3, 4), torch.float32)})  # four is fine
    writer.abort()


def test_contract_errors_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "c.gguf"
    writer = GGUFWriter(path)
    assert _message(ExecutionError, writer.finish) == f"{path}: finish() before begin()"
    writer.begin({"a": TensorMeta((2,), torch.float32), "b": TensorMeta((3,), torch.int64), "q": TensorMeta((32,), torch.float32, stored="Q8_0")})
    assert _message(ExecutionError, lambda: writer.begin({})) == f"{path}: begin() was called twice"
    assert _message(ExecutionError, lambda: writer.write("b", torch.ones(3))) == f"{path}: 'b' is float32[3] but begin() announced int64[3]"
    assert _message(ExecutionError, lambda: writer.write("b", torch.ones(4, dtype=torch.int64))) == (
        f"{path}: 'b' is int64[4] but begin() announced int64[3]"
    )
    assert _message(ExecutionError, lambda: writer.write("q", torch.ones(32))) == (
        f"{path}: 'q' was announced as Q8_0 blocks, which only write_raw can fill"
    )
    writer.write("a", torch.ones(2))
    assert _message(ExecutionError, writer.finish) == f"{path}: 2 announced tensors were never written, e.g. 'b'"
    writer.abort()


def test_a_folder_in_the_way_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.mkdir()
    writer = GGUFWriter(path)
    assert _message(ExecutionError, lambda: writer.begin({"a": TensorMeta((2,), torch.float32)})) == (
        f"{path}: cannot lay out the file: Is a directory"
    )


def test_an_existing_file_is_replaced_whole_and_missing_folders_are_made(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.gguf"
    _write(fresh, STATE)
    old = tmp_path / "deep" / "er" / "old.gguf"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\xaa" * 100_000)
    _write(old, STATE)
    assert old.read_bytes() == fresh.read_bytes()
    _write(tmp_path / "new" / "sub" / "n.gguf", STATE)
    assert (tmp_path / "new" / "sub" / "n.gguf").read_bytes() == fresh.read_bytes()


def test_tensors_arriving_in_any_order_land_at_their_offsets_with_zero_padding(tmp_path: Path) -> None:
    path = tmp_path / "o.gguf"
    writer = GGUFWriter(path)
    writer.begin({k: TensorMeta.of(v) for k, v in STATE.items()})
    for key in reversed(list(STATE)):
        writer.write(key, STATE[key])
    writer.finish()
    assert path.read_bytes() == _reference(tmp_path / "ref.gguf", "statebridge", [], STATE)


def _q8(n: int) -> np.ndarray:
    return gguf.quants.quantize(np.linspace(-1, 1, n, dtype=np.float32).reshape(1, n), Q.Q8_0)


def test_write_raw_copies_exact_bytes_and_refuses_a_wrong_length(tmp_path: Path) -> None:
    source_path = _gguf_with_fields(tmp_path / "s.gguf")
    source = GGUFSource(source_path)
    path = tmp_path / "o.gguf"
    writer = GGUFWriter(path)
    metas = dict(source.metas())
    writer.begin(metas)
    span = source.stored_span("blk.1.w")
    assert writer.write_raw("blk.1.w", [RawSpan(span.path, span.offset, span.length - 1)]) is False
    assert writer.write_raw("blk.1.w", [RawSpan(span.path, span.offset, 10), RawSpan(span.path, span.offset + 10, span.length - 10)]) is True
    assert _message(ExecutionError, lambda: writer.write_raw("blk.1.w", [span])) == f"{path}: 'blk.1.w' was written twice"
    for key in ("blk.0.w", "norm"):
        assert writer.write_raw(key, [source.stored_span(key)])
    writer.finish()
    out = GGUFSource(path)
    raw = path.read_bytes()
    for key in metas:
        theirs, mine = source.stored_span(key), out.stored_span(key)
        assert raw[mine.offset : mine.offset + mine.length] == source_path.read_bytes()[theirs.offset : theirs.offset + theirs.length], key


def test_write_raw_from_a_missing_file_names_target_key_and_source(tmp_path: Path) -> None:
    path = tmp_path / "o.gguf"
    writer = GGUFWriter(path)
    writer.begin({"a": TensorMeta((4,), torch.float32)})
    gone = tmp_path / "gone.bin"
    assert _message(ExecutionError, lambda: writer.write_raw("a", [RawSpan(gone, 0, 16)])).startswith(
        f"{path}: cannot copy 'a' from {gone}: "
    )
    writer.abort()


def test_empty_tensors_write_nothing_and_still_count(tmp_path: Path) -> None:
    path = tmp_path / "o.gguf"
    writer = GGUFWriter(path)
    writer.begin({"e": TensorMeta((0, 2), torch.float32), "r": TensorMeta((0,), torch.float32)})
    writer.write("e", torch.zeros(0, 2))
    assert writer.write_raw("r", []) is True
    assert writer.finish() == [path]
    assert path.read_bytes() == _reference(tmp_path / "ref.gguf", "statebridge", [], {"e": torch.zeros(0, 2), "r": torch.zeros(0)})


def test_file_type_is_the_most_common_type_first_to_reach_its_count() -> None:
    f32, f16, bf16 = (TensorMeta((2,), d) for d in (torch.float32, torch.float16, torch.bfloat16))
    q8 = TensorMeta((32,), torch.float32, stored="Q8_0")
    assert _file_type({}) == FT.ALL_F32
    assert _file_type({"a": f16}) == FT.MOSTLY_F16
    assert _file_type({"a": bf16}) == FT.MOSTLY_BF16
    assert _file_type({"a": f16, "b": bf16}) == FT.MOSTLY_F16  # a tie: the first to reach the count
    assert _file_type({"a": bf16, "b": f16}) == FT.MOSTLY_BF16
    assert _file_type({"a": f32, "b": f16, "c": f32}) == FT.ALL_F32
    assert _file_type({"a": f16, "b": f32, "c": f16}) == FT.MOSTLY_F16
    assert _file_type({"a": q8, "b": q8, "c": f16}) == FT.ALL_F32  # Q8_0 has no entry of its own here


def test_the_carried_file_type_is_kept_only_while_every_quantized_tensor_is(tmp_path: Path) -> None:
    source = GGUFSource(_gguf_with_fields(tmp_path / "s.gguf"))
    assert source.typed_fields["general.file_type"].value == FT.MOSTLY_Q8_0
    metas = dict(source.metas())

    def file_type(metas, dequantized=()) -> tuple[int, V]:  # type: ignore[no-untyped-def]
        writer = GGUFWriter(tmp_path / "o.gguf")
        writer.carry(source)
        writer.dequantized = list(dequantized)
        field = writer._key_values(metas)["general.file_type"]
        return (field.value, field.type)

    carried_type = source.typed_fields["general.file_type"].type
    assert file_type(metas) == (FT.MOSTLY_Q8_0, carried_type)  # blk.1.w kept its Q8_0 blocks
    assert file_type(metas, ["x"]) == (FT.MOSTLY_F16, carried_type)  # recomputed: f16, f32, Q8_0 -> the first
    plain = {k: TensorMeta(m.shape, m.dtype) for k, m in metas.items()}
    assert file_type(plain) == (FT.ALL_F32, carried_type)  # f16, f32, f32
    writer = GGUFWriter(tmp_path / "o.gguf")
    assert "general.file_type" not in writer._key_values(plain)  # nothing carried: none made up
    # the layout plans with the same key-values: a carried file type is recomputed there too
    writer.carry(source)
    assert [(f.name, sorted(f.keys)) for f in writer.layout(plain)] == [("o.gguf", sorted(plain))]


def test_carry_keeps_the_sources_fields_but_its_own_provenance_and_split_keys(tmp_path: Path) -> None:
    source = GGUFSource(_gguf_with_fields(tmp_path / "s.gguf"))
    writer = GGUFWriter(tmp_path / "o.gguf")
    writer.carry(source)
    assert "statebridge.fingerprint" in source.typed_fields
    assert set(writer.carried) == {k for k in source.typed_fields if k != "statebridge.fingerprint"}
    assert writer.metadata == {}
    # a split part's keys are not carried
    parts = tmp_path / "parts"
    _write(parts, STATE, shard_size=1)
    split_writer = GGUFWriter(tmp_path / "p.gguf")
    split_writer.carry(open_gguf(parts / "model-00001-of-00005.gguf"))
    assert not any(k.startswith("split.") for k in split_writer.carried)
    # a source of another format: its string metadata, as any writer carries it
    other = GGUFWriter(tmp_path / "o2.gguf", metadata={"mine": "1"})
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, tmp_path / "s.safetensors", metadata={"origin": "x"})
    other.carry(SafetensorsFile(tmp_path / "s.safetensors"))
    assert other.carried == {} and other.metadata == {"mine": "1"}  # safetensors metadata means nothing to gguf


def _split_fields(path: Path) -> dict[str, tuple[object, V]]:
    source = GGUFSource(path)
    return {k: (f.value, f.type) for k, f in source.typed_fields.items()}


def test_split_parts_cut_where_the_next_padded_tensor_would_pass_the_size(tmp_path: Path) -> None:
    # each tensor 40 bytes, 64 padded: 128 holds two, 127 only one
    state = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}
    metas = {k: TensorMeta.of(v) for k, v in state.items()}
    for size, names in (
        (128, [["t0", "t1"], ["t2", "t3"], ["t4"]]),
        (127, [["t0"], ["t1"], ["t2"], ["t3"], ["t4"]]),
        (64, [["t0"], ["t1"], ["t2"], ["t3"], ["t4"]]),
        (10**9, [list(state)]),
    ):
        planned = GGUFWriter(tmp_path / "f", shard_size=size, fields={"general.alignment": 64}).layout(metas)
        n = len(names)
        assert [(p.name, p.keys, p.nbytes) for p in planned] == [
            (f"model-{i + 1:05d}-of-{n:05d}.gguf", keys, 40 * len(keys)) for i, keys in enumerate(names)
        ], size
    folder = tmp_path / "split"
    writer = GGUFWriter(folder, shard_size=128, fields={"general.alignment": 64, "custom.x": "x"}, metadata={"statebridge.fingerprint": "fp"})
    writer.stem = "adapter_model"
    writer.begin(metas)
    for key in reversed(list(state)):
        writer.write(key, state[key])
    files = writer.finish()
    assert files == [folder / f"adapter_model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    first = _split_fields(files[0])
    assert first == {
        "general.architecture": ("statebridge", V.STRING),
        "general.alignment": (64, V.UINT32),
        "statebridge.fingerprint": ("fp", V.STRING),
        "custom.x": ("x", V.STRING),
        "split.no": (0, V.UINT16),
        "split.count": (3, V.UINT16),
        "split.tensors.count": (5, V.INT32),
    }
    for i in (1, 2):
        assert _split_fields(files[i]) == {
            "general.alignment": (64, V.UINT32),
            "statebridge.fingerprint": ("fp", V.STRING),
            "split.no": (i, V.UINT16),
            "split.count": (3, V.UINT16),
            "split.tensors.count": (5, V.INT32),
        }
    whole = open_gguf(files[0])
    assert list(whole.metas()) == list(state)
    for key, value in state.items():
        assert torch.equal(whole.load(key), value), key


def test_a_gguf_file_target_with_a_shard_size_is_one_file(tmp_path: Path) -> None:
    path = tmp_path / "one.GGUF"
    writer = GGUFWriter(path, shard_size=1)
    assert not writer.split and not writer.writes_folder
    assert GGUFWriter(tmp_path / "folder", shard_size=1).writes_folder
    assert not GGUFWriter(tmp_path / "folder").writes_folder
    assert GGUFWriter.for_target(path) and not GGUFWriter.for_target(tmp_path / "x.gguf.pt")
    writer.begin({k: TensorMeta.of(v) for k, v in STATE.items()})
    for key, value in STATE.items():
        writer.write(key, value)
    assert writer.finish() == [path]
    assert path.read_bytes() == _reference(tmp_path / "ref.gguf", "statebridge", [], STATE)


def test_too_many_parts_are_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is split.count's (a u16): 65,535 parts; checked here with a limit of 3, to stay fast."""
    assert gguf_writer.MAX_PARTS == 65_535 == 2**16 - 1
    monkeypatch.setattr(gguf_writer, "MAX_PARTS", 3)
    metas = {f"t{i}": TensorMeta((1,), torch.int8) for i in range(4)}
    writer = GGUFWriter(tmp_path / "f", shard_size=1)
    assert _message(ConfigError, lambda: writer.layout(metas)) == (
        f"GGUF output {tmp_path / 'f'}: shard_size 1 cuts the model into 4 parts; split GGUF allows at most 3: choose a larger shard_size"
    )
    assert _message(ConfigError, lambda: writer.begin(metas)).startswith(f"GGUF output {tmp_path / 'f'}: shard_size 1 cuts")
    assert not (tmp_path / "f").exists()
    del metas["t0"]
    assert len(writer.layout(metas)) == 3


def test_writeback_starts_every_64_mb_over_the_stretch_written_and_not_without_durability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = gguf_writer.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(gguf_writer, "start_writeback", spy)
    mib = 1024**2
    metas = {"a": TensorMeta((40 * mib // 4,), torch.float32), "b": TensorMeta((24 * mib // 4,), torch.float32), "c": TensorMeta((8,), torch.float32)}
    for durable in (True, False):
        calls.clear()
        writer = GGUFWriter(tmp_path / f"{durable}.gguf")
        writer.durable = durable
        writer.begin(metas)
        start = writer._where["a"][1]
        writer.write("b", torch.ones(24 * mib // 4))  # 24 MiB dirty
        writer.write("a", torch.ones(40 * mib // 4))  # 64 MiB: a and b, from a's start to b's end
        writer.write("c", torch.ones(8))  # 32 bytes: below the next 64 MiB
        writer.finish()
        assert calls == ([(start, 64 * mib)] if durable else []), durable
        assert writer._parts[0].dirty == ((writer._where["c"][1], writer._where["c"][1] + 32, 32) if durable else (2**63, 0, 0))


def test_finish_fsyncs_and_closes_every_part_and_abort_closes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(3)}
    writer = GGUFWriter(tmp_path / "f", shard_size=64)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    fds = [part.fd for part in writer._parts]
    for key, value in state.items():
        writer.write(key, value)
    files = writer.finish()
    assert synced == [f.stat().st_ino for f in files] and len(files) == 3
    assert [part.fd for part in writer._parts] == [-1, -1, -1]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert _message(ExecutionError, writer.finish) == f"{tmp_path / 'f'}: finish() before begin()"

    aborted = GGUFWriter(tmp_path / "g", shard_size=64)
    aborted.begin({k: TensorMeta.of(v) for k, v in state.items()})
    fds = [part.fd for part in aborted._parts]
    aborted.abort()
    assert [part.fd for part in aborted._parts] == [-1, -1, -1]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert _message(ExecutionError, lambda: aborted.write("t0", state["t0"])) == f"{tmp_path / 'g'}: write('t0') before begin()"
    aborted.abort()


def test_a_quantize_step_writes_the_gguf_librarys_blocks(tmp_path: Path) -> None:
    values = torch.linspace(-1, 1, 64).reshape(2, 32)
    path = tmp_path / "q.gguf"
    writer = GGUFWriter(path)
    writer.begin({"q": TensorMeta((2, 32), torch.float32, stored="Q8_0", encode=True)})
    writer.write("q", values)
    writer.finish()
    out = GGUFSource(path)
    span = out.stored_span("q")
    assert path.read_bytes()[span.offset : span.offset + span.length] == gguf.quants.quantize(values.numpy(), Q.Q8_0).tobytes()
    assert gguf.GGUFReader(path).tensors[0].tensor_type == Q.Q8_0


def test_the_layout_counts_quantized_tensors_at_their_stored_size(tmp_path: Path) -> None:
    metas = {"q": TensorMeta((2, 32), torch.float32, stored="Q8_0"), "f": TensorMeta((3,), torch.float16)}
    (planned,) = GGUFWriter(tmp_path / "o.gguf").layout(metas)
    assert (planned.name, planned.keys, planned.nbytes) == ("o.gguf", ["q", "f"], 68 + 6)


def test_split_folders_are_made_or_reused_and_a_tensor_over_the_size_gets_a_part_of_its_own(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((10,), float(i)) for i in range(3)}
    metas = {k: TensorMeta.of(v) for k, v in state.items()}
    planned = GGUFWriter(tmp_path / "f", shard_size=32).layout(metas)  # each 40 bytes, over 32
    assert [(p.name, p.keys) for p in planned] == [(f"model-0000{i + 1}-of-00003.gguf", [f"t{i}"]) for i in range(3)]
    for folder in (tmp_path / "a" / "b", tmp_path / "a" / "b"):  # made with its parents, then reused
        writer = GGUFWriter(folder, shard_size=32)
        writer.begin(metas)
        for key, value in state.items():
            writer.write(key, value)
        assert writer.finish() == [folder / p.name for p in planned]
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [p.name for p in planned]


def test_split_keys_given_as_fields_give_way_to_the_parts_own(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "f", shard_size=32, fields={"split.count": 9, "split.no": 7})
    writer.begin({"t0": TensorMeta((10,), torch.float32), "t1": TensorMeta((10,), torch.float32)})
    writer.write("t0", torch.ones(10))
    writer.write("t1", torch.ones(10))
    files = writer.finish()
    assert _split_fields(files[0])["split.count"] == (2, V.UINT16) and _split_fields(files[1])["split.no"] == (1, V.UINT16)
    one = GGUFWriter(tmp_path / "one.gguf", fields={"split.count": 9})  # not split: written as given
    one.begin({})
    one.finish()
    assert _split_fields(tmp_path / "one.gguf")["split.count"] == (9, V.INT32)


def test_files_are_made_with_mode_644_under_the_usual_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _write(tmp_path / "m.gguf", STATE)
    finally:
        os.umask(old)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("split", [False, True])
def test_write_errors_name_the_file_and_the_key(tmp_path: Path, split: bool) -> None:
    writer = GGUFWriter(tmp_path / ("f" if split else "m.gguf"), shard_size=1 << 20 if split else None)
    path = tmp_path / "f" / "model-00001-of-00001.gguf" if split else tmp_path / "m.gguf"
    writer.begin({"a": TensorMeta((4,), torch.float32), "b": TensorMeta((4,), torch.float32)})
    os.close(writer._parts[0].fd)
    assert _message(ExecutionError, lambda: writer.write("a", torch.ones(4))) == f"{path}: cannot write 'a': Bad file descriptor"
    gone = tmp_path / "gone.bin"
    assert _message(ExecutionError, lambda: writer.write_raw("b", [RawSpan(gone, 0, 16)])) == (
        f"{path}: cannot copy 'b' from {gone}: No such file or directory"
    )
    writer._parts[0].fd = -1
    writer.abort()


def test_a_string_field_holding_a_number_is_a_header_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    assert _message(ConfigError, lambda: GGUFWriter(path, fields={"custom.s": GGUFField(5, V.STRING)}).begin({})) == (
        f"GGUF output {path}: cannot write the header: object of type 'int' has no len()"
    )


def test_an_alignment_of_one_packs_tensors_back_to_back(tmp_path: Path) -> None:
    path = tmp_path / "one.gguf"
    state = {"a": torch.arange(3, dtype=torch.int8), "b": torch.arange(2, dtype=torch.int16)}
    _write(path, state, fields={"general.alignment": 1})
    source = GGUFSource(path)
    assert source.alignment == 1
    assert source.raw_span("b").offset == source.raw_span("a").offset + 3
    assert all(torch.equal(source.load(k), v) for k, v in state.items())
