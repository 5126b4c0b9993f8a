"""The safetensors reader, checked where mutation testing found the suite blind (docs/testing.md, Score).

Every malformed header gives its own exact one-line error naming the file and the key, on both
of the reader's paths: the fast one that checks each entry as the JSON parser finishes it, and the
full check that takes every entry when the header holds a boolean or a float anywhere (a ``"true"``
in ``__metadata__`` is enough).  What is accepted is read exactly: zero-size tensors, tensors in
storage order, bytes at their offsets, the boundaries of every limit.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from statebridge.errors import SourceError
from statebridge.readers import open_source
from statebridge.readers.safetensors import INDEX_NAME, MAX_HEADER_BYTES, SafetensorsFile, ShardedSafetensors
from statebridge.tensors.meta import SAFETENSORS_DTYPES
from statebridge.tensors.patterns import key_problem

#: a header holding this takes the full check for every entry (``true`` could be a boolean dimension)
FULL = {"__metadata__": {"why": "true"}}


@pytest.fixture(params=["fast", "full"])
def way(request) -> dict:
    """What to put first in a header: nothing (the fast path) or metadata that forces the full check."""
    return {} if request.param == "fast" else dict(FULL)


def _write(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _error(path: Path) -> str:
    """The one error opening ``path`` and loading every tensor gives."""
    with pytest.raises(SourceError) as caught:
        source = SafetensorsFile(path)
        for key in source.metas():
            source.load(key)
    assert caught.value.path == str(path)
    return str(caught.value)


def _entry(offsets: object = (0, 4), dtype: object = "F32", shape: object = (1,)) -> dict:
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}
    if isinstance(offsets, tuple):
        entry["data_offsets"] = list(offsets)
    return entry


# -- entries ----------------------------------------------------------------------------


@pytest.mark.parametrize("info", [[1, 2], "F32", 7])
def test_an_entry_that_is_not_an_object(tmp_path, way, info):
    path = _write(tmp_path / "m.safetensors", {**way, "w": info}, b"\0" * 4)
    assert _error(path) == f"{path}: tensor 'w': header entry is not an object"


@pytest.mark.parametrize(
    "offsets", [None, "ab", 4, [0], [0, 4, 8], [True, 5], [0.0, 4.0], [-4, 0], [8, 4], [4, 0]], ids=repr
)
def test_data_offsets_that_are_not_begin_and_end(tmp_path, way, offsets):
    entry = _entry(offsets)
    if offsets is None:
        del entry["data_offsets"]
    path = _write(tmp_path / "m.safetensors", {**way, "w": entry}, b"\0" * 8)
    assert _error(path) == f"{path}: tensor 'w': data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"


def test_a_span_that_does_not_fit_the_shape_is_measured_from_its_begin(tmp_path, way):
    header = {**way, "a": _entry((0, 4)), "b": _entry((4, 8), shape=(2,))}
    path = _write(tmp_path / "m.safetensors", header, b"\0" * 8)
    assert _error(path) == f"{path}: tensor 'b': data_offsets span 4 bytes but F32[2] needs 8 bytes"


def test_zero_size_tensors_anywhere_are_read_and_overlap_nothing(tmp_path, way):
    """``begin == end`` is a tensor with no bytes, wherever it lies, even inside another's span."""
    header = {
        **way,
        "a": _entry((0, 8), shape=(2,)),
        "inside": _entry((4, 4), dtype="F16", shape=(2, 0)),
        "first": _entry((0, 0), shape=(0,)),
        "end": _entry((8, 8), dtype="I64", shape=(0, 3)),
    }
    values = torch.tensor([1.5, -2.0])
    path = _write(tmp_path / "m.safetensors", header, values.numpy().tobytes())
    source = SafetensorsFile(path)
    assert list(source.metas()) == ["a", "first", "inside", "end"]  # by offset, then name
    assert source.metas()["inside"].shape == (2, 0)
    assert torch.equal(source.load("a"), values)
    for key, dtype, shape in [("inside", torch.float16, (2, 0)), ("first", torch.float32, (0,)), ("end", torch.int64, (0, 3))]:
        empty = source.load(key)
        assert (empty.dtype, tuple(empty.shape)) == (dtype, shape)


@pytest.mark.parametrize("dtype", ["F4X", 5, None, "f32"], ids=repr)
def test_an_unknown_dtype_lists_the_known_ones(tmp_path, way, dtype):
    path = _write(tmp_path / "m.safetensors", {**way, "w": _entry(dtype=dtype)}, b"\0" * 4)
    known = ", ".join(SAFETENSORS_DTYPES)
    assert known.startswith("BOOL, U8, ")  # as the format's own spec lists them
    assert _error(path) == f"{path}: tensor 'w': unknown dtype {dtype!r} (statebridge reads {known})"


@pytest.mark.parametrize("shape", [None, "3", [-1], [2, -1], [True], [1.0], [[1]]], ids=repr)
def test_a_shape_that_is_not_a_list_of_non_negative_integers(tmp_path, way, shape):
    entry = _entry(shape=shape)
    if shape is None:
        del entry["shape"]
    path = _write(tmp_path / "m.safetensors", {**way, "w": entry}, b"\0" * 4)
    assert _error(path) == f"{path}: tensor 'w': shape {shape!r} is not a list of non-negative integers"


@pytest.mark.parametrize(
    "dtype, shape",
    [("U8", [2**63]), ("U8", [2**62, 2]), ("F32", [2**61]), ("U8", [0, 2**62, 2]), ("U8", [2**62, 0, 2])],
    ids=["u8-2^63", "u8-2^62x2", "f32-2^61", "empty-but-strides-overflow", "empty-in-the-middle"],
)
def test_a_shape_whose_sizes_overflow_int64_is_refused(tmp_path, way, dtype, shape):
    """torch computes sizes and strides in int64 even for a tensor with no elements: 2**63 bytes is one too many."""
    path = _write(tmp_path / "m.safetensors", {**way, "w": _entry((0, 0), dtype, shape)})
    assert _error(path) == f"{path}: tensor 'w': shape {shape!r} is too large for torch (its sizes overflow int64)"


@pytest.mark.parametrize("dtype, shape", [("U8", [2**63 - 1]), ("F32", [2**61 - 1]), ("U8", [0, 2**62 - 1, 2])])
def test_a_shape_just_inside_int64_is_only_too_large_for_the_file(tmp_path, way, dtype, shape):
    nbytes = (2**63 - 1 if dtype == "U8" else 4 * (2**61 - 1)) if shape[0] else 0
    path = _write(tmp_path / "m.safetensors", {**way, "w": _entry((0, nbytes), dtype, shape)})
    size = path.stat().st_size
    if nbytes:
        assert _error(path) == f"{path}: tensor 'w': data ends at byte {size + nbytes} but the file has {size} bytes (truncated?)"
    else:
        assert SafetensorsFile(path).metas()["w"].shape == tuple(shape)


@pytest.mark.parametrize("length, shown", [(118, None), (119, 121), (300, 302)])
def test_long_names_are_cut_in_messages(tmp_path, way, length, shown):
    key = "k" * length
    path = _write(tmp_path / "m.safetensors", {**way, key: _entry(dtype="XX")}, b"\0" * 4)
    name = repr(key) if shown is None else f"{repr(key)[:100]}... ({shown} characters)"
    assert _error(path) == f"{path}: tensor {name}: unknown dtype 'XX' (statebridge reads {', '.join(SAFETENSORS_DTYPES)})"


def test_long_header_values_are_cut_in_messages(tmp_path, way):
    shape = list(range(1, 60))
    path = _write(tmp_path / "m.safetensors", {**way, "w": _entry(shape=[*shape, -1])}, b"\0" * 4)
    text = repr([*shape, -1])
    assert _error(path) == (
        f"{path}: tensor 'w': shape {text[:100]}... ({len(text)} characters) is not a list of non-negative integers"
    )


# -- names given twice ------------------------------------------------------------------


def _raw_header(tmp_path: Path, text: str, data: bytes = b"\0" * 8) -> Path:
    return _write(tmp_path / "m.safetensors", text.encode(), data)


ENTRY = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize(
    "text, twice",
    [
        ('{"a":' + ENTRY + ',"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"w":' + ENTRY + "}", "w"),
        ('{"w":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}', "shape"),
        ('{"__metadata__":{"a":"1","b":"2","b":"3"},"w":' + ENTRY + "}", "b"),
        ('{"__metadata__":{"x":"true"},"w":{"dtype":"F32","data_offsets":[0,4],"shape":[1],"shape":[1]}}', "shape"),
    ],
    ids=["tensor", "field", "metadata", "field-full-check"],
)
def test_a_name_given_twice_is_named(tmp_path, text, twice):
    path = _raw_header(tmp_path, text)
    assert _error(path) == f"{path}: header names {twice!r} twice; which one is meant?"


# -- the prefix and the header as a whole -----------------------------------------------


def test_a_file_shorter_than_the_prefix(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x02" * 7)
    assert _error(path) == f"{path}: file is 7 bytes, too short to be safetensors (truncated?)"


def test_the_header_limit_is_inclusive(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    assert _error(path) == f"{path}: header claims {MAX_HEADER_BYTES + 1} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file?"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
    assert _error(path) == (
        f"{path}: header claims {MAX_HEADER_BYTES} bytes but the file has only 2 after the prefix (truncated?)"
    )


def test_a_header_that_fills_the_file_exactly_is_read(tmp_path):
    path = _write(tmp_path / "m.safetensors", b'{"__metadata__":{"a":"b"}}')
    source = SafetensorsFile(path)
    assert (dict(source.metas()), dict(source.metadata)) == ({}, {"a": "b"})
    path.write_bytes(path.read_bytes()[:-1])
    assert _error(path) == f"{path}: header claims 26 bytes but the file has only 25 after the prefix (truncated?)"


@pytest.mark.parametrize("text", ["[]", '"x"', "7", "null"])
def test_a_header_that_is_not_an_object(tmp_path, text):
    path = _raw_header(tmp_path, text)
    assert _error(path) == f"{path}: header is not a JSON object"


def test_a_header_that_is_not_json(tmp_path):
    path = _raw_header(tmp_path, '{"w": ')
    message = _error(path)
    assert message.startswith(f"{path}: header is not valid JSON (Expecting value: line 1 column 7 (char 6))")
    assert message.endswith("; not a safetensors file?")
    path = _write(path, b'{"\xff": 1}')
    assert _error(path).startswith(f"{path}: header is not valid JSON ('utf-8' codec can't decode byte 0xff")


def test_a_number_thousands_of_digits_long(tmp_path):
    path = _raw_header(tmp_path, '{"w":{"dtype":"F32","shape":[' + "1" * 5000 + '],"data_offsets":[0,4]}}')
    assert _error(path) == f"{path}: header holds a number thousands of digits long; not a safetensors file?"


def test_json_nested_thousands_of_levels_deep(tmp_path):
    path = _raw_header(tmp_path, '{"w":' + "[" * 100_000 + "]" * 100_000 + "}")
    assert _error(path) == f"{path}: header JSON is nested thousands of levels deep; not a safetensors file?"


# -- __metadata__ -----------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [[1], "text", {"a": 1}, {"a": "b", "c": None}, {"a": ["b"]}, 3], ids=repr)
def test_metadata_that_is_not_strings_to_strings(tmp_path, metadata):
    path = _write(tmp_path / "m.safetensors", {"__metadata__": metadata, "w": _entry()}, b"\0" * 4)
    assert _error(path) == f"{path}: __metadata__ must map strings to strings"


@pytest.mark.parametrize("metadata", [None, {}, "", []], ids=repr)
def test_empty_metadata_is_no_metadata(tmp_path, metadata):
    path = _write(tmp_path / "m.safetensors", {"__metadata__": metadata, "w": _entry()}, b"\0" * 4)
    source = SafetensorsFile(path)
    assert dict(source.metadata) == {}
    assert list(source.metas()) == ["w"]


def test_metadata_is_read_as_stored(tmp_path, way):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", "note": "true", "é": "ü"})
    assert dict(SafetensorsFile(path).metadata) == {"format": "pt", "note": "true", "é": "ü"}


@pytest.mark.parametrize("where", ["key", "value"])
def test_metadata_text_that_is_no_character(tmp_path, where):
    pair = '"\\ud800":"x"' if where == "key" else '"k":"a\\udc00"'
    path = _raw_header(tmp_path, '{"__metadata__":{' + pair + '},"w":' + ENTRY + "}")
    key = "\ud800" if where == "key" else "k"
    problem = key_problem("\ud800" if where == "key" else "a\udc00")
    assert _error(path) == f"{path}: __metadata__ entry {key!r}: its text {problem}"


# -- where the data lies ----------------------------------------------------------------


def test_a_tensor_ending_past_the_file_names_the_byte(tmp_path, way):
    header = {**way, "a": _entry((0, 4)), "b": _entry((4, 12), shape=(2,))}
    path = _write(tmp_path / "m.safetensors", header, b"\0" * 11)
    size = path.stat().st_size
    assert _error(path) == f"{path}: tensor 'b': data ends at byte {size + 1} but the file has {size} bytes (truncated?)"
    path.write_bytes(path.read_bytes() + b"\0")  # ending exactly at the end of the file is fine
    assert list(SafetensorsFile(path).metas()) == ["a", "b"]


def test_overlaps_are_named_past_zero_size_tensors(tmp_path, way):
    """A zero-size tensor between two others is no boundary: the overlap of the two is still found."""
    header = {**way, "a": _entry((0, 8), shape=(2,)), "e": _entry((4, 4), shape=(0,)), "b": _entry((6, 10), dtype="U8", shape=(4,))}
    path = _write(tmp_path / "m.safetensors", header, b"\0" * 10)
    assert _error(path) == f"{path}: tensors 'a' and 'b' overlap in the data section"


def test_overlap_by_one_byte_and_adjacent_spans(tmp_path, way):
    header = {**way, "b": _entry((3, 7)), "a": _entry((0, 4))}
    path = _write(tmp_path / "m.safetensors", header, b"\0" * 8)
    assert _error(path) == f"{path}: tensors 'a' and 'b' overlap in the data section"
    header = {**way, "b": _entry((4, 8)), "a": _entry((0, 4)), "c": _entry((8, 8), shape=(0,))}
    path = _write(tmp_path / "m.safetensors", header, b"\0" * 8)
    assert list(SafetensorsFile(path).metas()) == ["a", "b", "c"]


def test_tensors_are_listed_and_found_in_storage_order(tmp_path, way):
    values = {"z": torch.tensor([1.0, 2.0]), "m": torch.tensor([3], dtype=torch.int16), "a": torch.tensor([4.0], dtype=torch.float64)}
    header = {**way, "a": _entry((12, 20), "F64"), "z": _entry((0, 8), shape=(2,)), "m": _entry((8, 10), "I16")}
    data = values["z"].numpy().tobytes() + values["m"].numpy().tobytes() + b"\0\0" + values["a"].numpy().tobytes()
    path = _write(tmp_path / "m.safetensors", header, data)
    source = SafetensorsFile(path)
    assert list(source.metas()) == ["z", "m", "a"]
    start = 8 + len(json.dumps(header, separators=(",", ":")))
    assert [(s.path, s.offset, s.length) for s in map(source.raw_span, source.metas())] == [
        (path, start, 8),
        (path, start + 8, 2),
        (path, start + 12, 8),
    ]
    for key, value in values.items():
        assert torch.equal(source.load(key), value)


# -- loading ----------------------------------------------------------------------------


def test_tensors_past_the_first_pages_load_from_their_own_offset(tmp_path):
    """The map starts at a page boundary before the tensor; the tensor starts where its bytes do."""
    page = mmap.ALLOCATIONGRANULARITY
    tensors = {
        "a": torch.arange(page // 4 + 3, dtype=torch.float32),
        "b": torch.arange(7, dtype=torch.int16) - 3,
        "c": torch.arange(2 * page + 5, dtype=torch.uint8),
        "d": torch.arange(10, dtype=torch.float64) / 3,
        "e": torch.arange(100, dtype=torch.uint8) * 2,  # stored last: past two pages
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    source = SafetensorsFile(path)
    offsets = sorted(source.raw_span(key).offset for key in tensors)
    assert offsets[-1] > 2 * page and any(offset % page for offset in offsets)
    for key, value in tensors.items():
        loaded = source.load(key)
        assert loaded.dtype == value.dtype
        assert torch.equal(loaded, value), key
    assert tuple(source.load("c").shape) == (2 * page + 5,)


def test_a_file_that_changed_size_since_it_was_opened_is_not_mapped(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path)
    source = SafetensorsFile(path)
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(SourceError) as caught:
        source.load("w")
    assert str(caught.value) == (
        f"{path}: file changed on disk since it was opened ({size} bytes then, {size + 1} now); open it again"
    )


def test_unknown_keys_are_one_error_naming_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path)
    source = SafetensorsFile(path)
    for read in (source.load, source.raw_span):
        with pytest.raises(SourceError) as caught:
            read("v")
        assert str(caught.value) == f"{path}: no tensor named 'v'"


def test_zero_size_tensors_load_without_reading_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"e": torch.zeros(3, 0, dtype=torch.bfloat16), "w": torch.ones(1)}, path)
    source = SafetensorsFile(path)
    path.write_bytes(path.read_bytes() + b"\0")  # a load that mapped the file would refuse now
    empty = source.load("e")
    assert (empty.dtype, tuple(empty.shape)) == (torch.bfloat16, (3, 0))


# -- sharded folders --------------------------------------------------------------------

FIRST, SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Two shards with metadata of their own and an index, as save_pretrained lays them out."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.arange(3.0)}, folder / FIRST, metadata={"format": "pt", "from": "first", "x": "1"})
    save_file({"c": torch.full((4,), 7.0)}, folder / SECOND, metadata={"format": "pt", "from": "second"})
    _index(folder, {"metadata": {"total_size": 36}, "weight_map": {"a": FIRST, "b": FIRST, "c": SECOND}})
    return folder


def _index(folder: Path, index: object, name: str = INDEX_NAME) -> Path:
    (folder / name).write_text(index if isinstance(index, str) else json.dumps(index))
    return folder / name


def _sharded_error(path: Path, index: Path | None = None) -> str:
    with pytest.raises(SourceError) as caught:
        ShardedSafetensors(path, index)
    return str(caught.value)


def test_a_sharded_folder_reads_every_shard_and_merges_metadata_index_last(sharded):
    source = ShardedSafetensors(sharded)
    assert source.name == str(sharded)
    assert source.files() == [sharded / FIRST, sharded / SECOND]
    assert list(source.metas()) == ["a", "b", "c"]
    assert dict(source.metadata) == {"format": "pt", "from": "second", "x": "1", "total_size": "36"}
    assert torch.equal(source.load("c"), torch.full((4,), 7.0))
    span = source.raw_span("b")
    assert (span.path, span.length) == (sharded / FIRST, 12)
    for read in (source.load, source.raw_span):
        with pytest.raises(SourceError) as caught:
            read("d")
        assert str(caught.value) == f"{sharded}: no tensor named 'd'"


def test_a_folder_without_an_index_has_the_shards_metadata(sharded):
    (sharded / INDEX_NAME).unlink()
    source = ShardedSafetensors(sharded)
    assert dict(source.metadata) == {"format": "pt", "from": "second", "x": "1"}
    assert list(source.metas()) == ["a", "b", "c"]


@pytest.mark.parametrize("metadata", [[1, 2], "text", None, 5])
def test_index_metadata_that_is_no_object_is_ignored(sharded, metadata):
    _index(sharded, {"metadata": metadata, "weight_map": {"a": FIRST, "b": FIRST, "c": SECOND}})
    assert dict(ShardedSafetensors(sharded).metadata) == {"format": "pt", "from": "second", "x": "1"}


def test_an_index_of_another_name_is_read_when_named(sharded):
    (sharded / INDEX_NAME).rename(sharded / "other.safetensors.index.json")
    source = open_source(sharded / "other.safetensors.index.json")
    assert (source.name, list(source.metas())) == (str(sharded), ["a", "b", "c"])


@pytest.mark.parametrize("where", ["key", "value"])
def test_index_metadata_text_that_is_no_character(sharded, where):
    pair = '"\\ud800":"x"' if where == "key" else '"k":"a\\udc00"'
    weight_map = json.dumps({"a": FIRST, "b": FIRST, "c": SECOND})
    index = _index(sharded, '{"metadata":{' + pair + '},"weight_map":' + weight_map + "}")
    key = "\ud800" if where == "key" else "k"
    problem = key_problem("\ud800" if where == "key" else "a\udc00")
    assert _sharded_error(sharded) == f"{index}: the shard index's metadata entry {key!r}: its text {problem}"


def test_index_metadata_keys_are_cut_at_200_characters(sharded):
    key = "m" * 250 + "\ud800"
    index = _index(sharded, '{"metadata":{"' + key[:-1] + '\\ud800":"x"},"weight_map":{"a":"' + FIRST + '"}}')
    problem = key_problem(key)
    assert _sharded_error(sharded) == f"{index}: the shard index's metadata entry {key[:200]!r}: its text {problem}"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"weight_map": {"a": "s.safetensors"}, "n": ' + "1" * 5000 + "}", "the shard index holds a number thousands of digits long; re-download or regenerate it"),
        ('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}", "the shard index is JSON nested thousands of levels deep; re-download or regenerate it"),
        ("[1, 2]", "the shard index has no 'weight_map' object of key -> file name"),
        ('{"weights": {}}', "the shard index has no 'weight_map' object of key -> file name"),
        ('{"weight_map": ["a"]}', "the shard index has no 'weight_map' object of key -> file name"),
        ('{"weight_map": {"a": 1}}', "the shard index has no 'weight_map' object of key -> file name"),
        ('{"weight_map": {"a": "x.safetensors", "b": null}}', "the shard index has no 'weight_map' object of key -> file name"),
        ('{"weight_map": {}}', "the shard index's weight_map is empty: it names no tensor and no shard"),
        (
            '{"weight_map": {"a": "s.safetensors", "w": "s.safetensors", "w": "s.safetensors"}}',
            "the shard index names 'w' twice; which one is meant? (re-download or regenerate it)",
        ),
    ],
    ids=["long-number", "deep", "list", "no-weight-map", "weight-map-list", "not-a-name", "null-name", "empty", "twice"],
)
def test_index_errors_are_exact(sharded, text, message):
    index = _index(sharded, text)
    assert _sharded_error(sharded) == f"{index}: {message}"


def test_a_long_key_named_twice_in_the_index_is_cut(sharded):
    key = "k" * 300
    index = _index(sharded, '{"weight_map": {"' + key + '": "a", "' + key + '": "a"}}')
    assert _sharded_error(sharded) == f"{index}: the shard index names {key[:200]!r} twice; which one is meant? (re-download or regenerate it)"


def test_an_index_of_invalid_json_or_text(sharded):
    index = _index(sharded, '{"weight_map": ')
    message = _sharded_error(sharded)
    assert message.startswith(f"{index}: the shard index is not valid JSON (Expecting value")
    assert message.endswith("); re-download or regenerate it")
    index.write_bytes(b'{"weight_map": {"\xff": "a"}}')
    assert _sharded_error(sharded).startswith(f"{index}: the shard index is not valid JSON ('utf-8' codec can't decode")


@pytest.mark.parametrize("name", ["..", "../x.safetensors", "a/../../x.safetensors", "/abs/x.safetensors"])
def test_shards_outside_the_folder(sharded, name):
    index = _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": name}})
    assert _sharded_error(sharded) == f"{index}: shard {name!r} lies outside the checkpoint folder; refusing to read it"


@pytest.mark.parametrize("name", ["model.bin", "..x", "a/..", "model.safetensors.gz"])
def test_shards_that_are_not_safetensors(sharded, name):
    index = _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": name}})
    assert _sharded_error(sharded) == (
        f"{index}: shard {name!r} is not a .safetensors file; only sharded safetensors are read "
        "(load a sharded .bin checkpoint with transformers and save it with save_pretrained first)"
    )


@pytest.mark.parametrize("length", [200, 201])
def test_a_missing_shard_is_named_and_long_names_are_cut(sharded, length):
    name = "s" * (length - len(".safetensors")) + ".safetensors"
    index = _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": name}})
    if length <= 200:
        expected = f"shard {name!r} named in the index does not exist (looked for {sharded / name})"
    else:
        expected = f"shard {name[:150]!r}... ({length} characters) named in the index does not exist"
    assert _sharded_error(sharded) == f"{index}: {expected}"


def test_a_shard_name_too_long_to_look_up(sharded):
    name = "s" * 300 + ".safetensors"
    index = _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": name}})
    assert _sharded_error(sharded) == (
        f"{index}: shard {name[:150]!r}... ({len(name)} characters) named in the index cannot be looked up: File name too long"
    )


def test_one_shard_spelled_two_ways_is_read_once(sharded):
    _index(sharded, {"weight_map": {"a": FIRST, "b": "./" + FIRST, "c": SECOND}})
    source = ShardedSafetensors(sharded)
    assert source.files() == [sharded / FIRST, sharded / SECOND]
    assert torch.equal(source.load("b"), torch.arange(3.0))


def test_shards_and_index_that_do_not_belong_together(sharded):
    index = sharded / INDEX_NAME
    _index(sharded, {"weight_map": {"a": FIRST, "c": SECOND}})
    assert _sharded_error(sharded) == (
        f"{sharded / FIRST}: holds tensor 'b', but {INDEX_NAME} does not list it; the index and the shards do not "
        "belong together (every tensor a shard holds must be in the index's weight_map)"
    )
    _index(sharded, {"weight_map": {"a": FIRST, "b": SECOND, "c": SECOND}})
    assert _sharded_error(sharded) == (
        f"{sharded / FIRST}: holds tensor 'b', but {INDEX_NAME} puts it in {SECOND}; the index and the shards do not "
        "belong together (every tensor a shard holds must be in the index's weight_map)"
    )
    _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": SECOND}})
    assert _sharded_error(sharded) == (
        f"{index}: the index puts tensor 'd' in {SECOND}, but that shard has no such tensor; "
        "the index and the shards do not belong together"
    )
    _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": SECOND, "e": FIRST}})
    assert _sharded_error(sharded) == (
        f"{index}: the index puts tensor 'd' in {SECOND}, but that shard has no such tensor (1 more tensors are "
        "missing too); the index and the shards do not belong together"
    )
    _index(sharded, {"weight_map": {"a": FIRST, "b": FIRST, "c": SECOND, "d": SECOND, "e": FIRST, "f": FIRST}})
    assert _sharded_error(sharded) == (
        f"{index}: the index puts tensor 'd' in {SECOND}, but that shard has no such tensor (2 more tensors are "
        "missing too); the index and the shards do not belong together"
    )


def test_a_shard_the_index_does_not_name(sharded):
    save_file({"d": torch.ones(1)}, sharded / "extra.safetensors")
    assert _sharded_error(sharded) == (
        f"{sharded / 'extra.safetensors'}: is in the checkpoint folder but {INDEX_NAME} does not name it, so its tensors "
        f"would be left out; move it away, or open {sharded / INDEX_NAME} itself to read only the shards it names"
    )
    assert list(ShardedSafetensors(sharded, sharded / INDEX_NAME).metas()) == ["a", "b", "c"]


def test_without_an_index_a_key_in_two_shards_is_refused(sharded):
    (sharded / INDEX_NAME).unlink()
    save_file({"c": torch.ones(1)}, sharded / "model-00003.safetensors")
    assert _sharded_error(sharded) == f"{sharded / 'model-00003.safetensors'}: tensor 'c' is also in {SECOND}; which one is meant?"
    for shard in sharded.glob("*.safetensors"):
        shard.unlink()
    assert _sharded_error(sharded) == f"{sharded}: no *.safetensors files and no model.safetensors.index.json here"


# -- the fast path: one TensorMeta per (dtype, shape), and nothing it may not take -----------


def test_entries_of_one_dtype_and_shape_share_one_meta(tmp_path):
    """200,000-tensor headers stay small: every entry of a (dtype, shape) pair shares one TensorMeta,
    whatever the order of its fields, at offset 0 or later, with or without elements."""
    header = {
        "a": _entry((0, 8), shape=(2,)),
        "b": {"shape": [2], "data_offsets": [8, 16], "dtype": "F32"},
        "c": {"data_offsets": [16, 24], "dtype": "F32", "shape": [2]},
        "e1": _entry((24, 24), shape=(2, 0)),
        "e2": {"shape": [2, 0], "dtype": "F32", "data_offsets": [24, 24]},
        "i": _entry((24, 26), "I16"),
        "j": _entry((26, 28), "I16"),
    }
    path = _write(tmp_path / "m.safetensors", header, bytes(range(28)))
    source = SafetensorsFile(path)
    assert source.name == str(path)
    metas = source.metas()
    assert metas["a"] is metas["b"] is metas["c"]
    assert metas["e1"] is metas["e2"]
    assert metas["i"] is metas["j"]
    assert metas["a"] is not metas["e1"] and metas["a"].shape == (2,)
    assert torch.equal(source.load("c"), torch.frombuffer(bytearray(range(16, 24)), dtype=torch.float32))


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"dtyp": "F32", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype None (statebridge reads {known})"),
        ({"dtype": "F32", "shap": [1], "data_offsets": [0, 4]}, "shape None is not a list of non-negative integers"),
        ({"dtype": "F32", "shape": [1], "data_offset": [0, 4]}, "data_offsets None are not [begin, end] with 0 <= begin <= end"),
    ],
    ids=["dtype", "shape", "data_offsets"],
)
def test_a_misspelled_field_in_its_usual_place_is_missing(tmp_path, entry, problem):
    path = _write(tmp_path / "m.safetensors", {"w": entry}, b"\0" * 4)
    assert _error(path) == f"{path}: tensor 'w': " + problem.format(known=", ".join(SAFETENSORS_DTYPES))


@pytest.mark.parametrize(
    "known, lying",
    [([2, 1], "[2, true]"), ([2, 0], "[2, false]"), ([2], "[2.0]"), ([1, 1], "[true, 1.0]")],
    ids=["true-as-1", "false-as-0", "float", "both"],
)
def test_booleans_and_floats_are_never_taken_for_the_integers_they_equal(tmp_path, known, lying):
    """``(2, True) == (2, 1)``: a dimension that is a boolean or a float must not find the meta of the integers."""
    nbytes = 4 * math.prod(known)
    text = '{"a":' + json.dumps(_entry((0, nbytes), shape=tuple(known))) + ',"b":{"dtype":"F32","shape":' + lying
    text += ',"data_offsets":[' + f"{nbytes},{2 * nbytes}" + "]}}"
    path = _write(tmp_path / "m.safetensors", text.encode(), b"\0" * (2 * nbytes))
    shown = repr(json.loads(lying))
    assert _error(path) == f"{path}: tensor 'b': shape {shown} is not a list of non-negative integers"


def test_a_negative_dimension_with_offsets_to_match_is_refused(tmp_path, way):
    path = _write(tmp_path / "m.safetensors", {**way, "w": _entry((4, 0), shape=(-1,))}, b"\0" * 4)
    assert _error(path) == f"{path}: tensor 'w': shape [-1] is not a list of non-negative integers"


def test_a_header_length_past_2_to_the_63_is_not_negative(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\xff" * 8 + b'{"w":' + ENTRY.encode() + b"}" + b"\0" * 4)
    assert _error(path) == f"{path}: header claims {2**64 - 1} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file?"


@pytest.mark.parametrize("escape", ["\\ud800", "\\uDFFF"])
def test_a_tensor_name_that_is_no_text_is_named_with_the_file(tmp_path, way, escape):
    """A lone surrogate, spelled as a JSON escape in either case (names are checked only when one is there)."""
    prefix = '{"__metadata__":{"why":"true"},' if way else "{"
    path = _raw_header(tmp_path, prefix + '"a' + escape + 'b":' + ENTRY + "}")
    key = "a" + json.loads('"' + escape + '"') + "b"
    assert _error(path) == f"{path}: tensor name {key!r} {key_problem(key)}"
