"""The safetensors writer, checked where mutation testing found the suite blind (docs/testing.md, Score).

Files are checked byte for byte: the header text and its padding, where each tensor lies, how
tensors are cut into shards and how those are named, the index's text; the layout a dry run
shows is the one written; a second process joining the layout writes into the same files; every
error names the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from statebridge.errors import ConfigError, ExecutionError
from statebridge.readers import open_source
from statebridge.readers.base import RawSpan
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.base import PlannedFile
from statebridge.writers.safetensors import DEFAULT_SHARD_SIZE, SafetensorsWriter

TENSORS = {
    "a": torch.tensor([1.5, -2.0]),  # 8 bytes
    "b": torch.tensor([1, -2, 3], dtype=torch.int16),  # 6 bytes
    "c": torch.tensor([7], dtype=torch.int32),  # 4 bytes
    "d": torch.arange(5, dtype=torch.float32),  # 20 bytes
}


def _metas(tensors: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {key: TensorMeta.of(tensor) for key, tensor in tensors.items()}


def _write_all(writer: SafetensorsWriter, tensors: dict[str, torch.Tensor], order: list[str] | None = None) -> list[Path]:
    writer.begin(_metas(tensors))
    for key in order or list(tensors):
        writer.write(key, tensors[key])
    return writer.finish()


def _header(path: Path) -> tuple[bytes, bytes]:
    """A safetensors file's header text (padding included) and its data section."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + length], data[8 + length :]


def _entries(tensors: dict[str, torch.Tensor]) -> str:
    parts, offset = [], 0
    for key, tensor in tensors.items():
        code = {torch.float32: "F32", torch.int16: "I16", torch.int32: "I32"}[tensor.dtype]
        parts.append(f'"{key}":{{"dtype":"{code}","shape":{list(tensor.shape)},"data_offsets":[{offset},{offset + tensor.nbytes}]}}'.replace(" ", ""))
        offset += tensor.nbytes
    return ",".join(parts)


def test_one_file_byte_for_byte(tmp_path):
    """Header in plan order with the metadata first, spaces to a multiple of 8, then each tensor at its offset."""
    path = tmp_path / "one.safetensors"
    writer = SafetensorsWriter(path, metadata={"k": "v", "é": "ü"})
    assert (writer.single_file, writer.writes_folder) == (True, False)
    assert _write_all(writer, TENSORS, order=["d", "b", "c", "a"]) == [path]
    header, data = _header(path)
    text = '{"__metadata__":{"format":"pt","k":"v","é":"ü"},' + _entries(TENSORS) + "}"
    assert header == text.encode() + b" " * (-len(text.encode()) % 8)
    assert data == b"".join(t.numpy().tobytes() for t in TENSORS.values())
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_a_header_already_a_multiple_of_8_gets_no_padding(tmp_path):
    for length in range(8):  # one of these metadata lengths makes the header a multiple of 8
        path = tmp_path / f"{length}.safetensors"
        _write_all(SafetensorsWriter(path, metadata={"m": "x" * length}), {"a": TENSORS["a"]})
        header, _ = _header(path)
        assert len(header) % 8 == 0
        assert len(header.rstrip(b" ")) > len(header) - 8


def test_shards_cut_where_the_next_tensor_would_pass_the_size(tmp_path):
    """8 bytes, then 6 + 4 = 10 (equal to the size: one shard), then 20 alone (larger than the size)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    writer = SafetensorsWriter(folder, metadata={"k": "v"}, shard_size=10)
    assert (writer.single_file, writer.writes_folder) == (False, True)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    planned = writer.layout(_metas(TENSORS))
    files = _write_all(writer, TENSORS, order=["c", "d", "a", "b"])
    assert files == [folder / n for n in names] + [folder / "model.safetensors.index.json"]
    assert [sorted(load_file(f)) for f in files[:3]] == [["a"], ["b", "c"], ["d"]]
    index = {"metadata": {"total_size": 38, "k": "v"}, "weight_map": {"a": names[0], "b": names[1], "c": names[1], "d": names[2]}}
    assert files[3].read_text() == json.dumps(index, indent=2) + "\n"
    assert planned == [
        PlannedFile(names[0], ["a"], files[0].stat().st_size),
        PlannedFile(names[1], ["b", "c"], files[1].stat().st_size),
        PlannedFile(names[2], ["d"], files[2].stat().st_size),
        PlannedFile("model.safetensors.index.json", [], files[3].stat().st_size),
    ]
    header, data = _header(files[1])
    text = '{"__metadata__":{"format":"pt","k":"v"},' + _entries({"b": TENSORS["b"], "c": TENSORS["c"]}) + "}"
    assert header.rstrip(b" ") == text.encode()
    assert data == TENSORS["b"].numpy().tobytes() + TENSORS["c"].numpy().tobytes()


def test_a_first_tensor_larger_than_the_shard_size_opens_no_empty_shard(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    tensors = {"d": TENSORS["d"], "a": TENSORS["a"]}
    files = _write_all(SafetensorsWriter(folder, shard_size=10), tensors)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert [list(load_file(f)) for f in files[:2]] == [["d"], ["a"]]


def test_without_a_shard_size_a_folder_gets_one_file_and_no_index(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    writer = SafetensorsWriter(folder)
    assert DEFAULT_SHARD_SIZE == 5 * 1024**3
    assert writer.layout(_metas(TENSORS)) == [PlannedFile("model.safetensors", list(TENSORS), 8 + len(_header_of(writer)) + 38)]
    assert _write_all(writer, TENSORS) == [folder / "model.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]


def _header_of(writer: SafetensorsWriter) -> bytes:
    return writer._headers(_metas(TENSORS))[0][1]


def test_a_single_file_ignores_the_shard_size(tmp_path):
    path = tmp_path / "one.safetensors"
    writer = SafetensorsWriter(path, shard_size=1)
    assert [f.name for f in writer.layout(_metas(TENSORS))] == ["one.safetensors"]
    assert _write_all(writer, TENSORS) == [path]
    assert list(load_file(path)) == list(TENSORS)


def test_the_stem_names_shards_and_index(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    writer = SafetensorsWriter(folder, shard_size=10)
    writer.stem = "adapter_model"
    files = _write_all(writer, {"a": TENSORS["a"], "d": TENSORS["d"]})
    assert [f.name for f in files] == [
        "adapter_model-00001-of-00002.safetensors",
        "adapter_model-00002-of-00002.safetensors",
        "adapter_model.safetensors.index.json",
    ]
    single = tmp_path / "single"
    single.mkdir()
    writer = SafetensorsWriter(single)
    writer.stem = "adapter_model"
    assert _write_all(writer, {"a": TENSORS["a"]}) == [single / "adapter_model.safetensors"]


def test_the_writer_is_chosen_for_safetensors_files_and_folders():
    assert SafetensorsWriter.for_target(Path("x/model.safetensors"))
    assert SafetensorsWriter.for_target(Path("x/folder"))
    assert not SafetensorsWriter.for_target(Path("x/model.pt"))
    assert not SafetensorsWriter.for_target(Path("x/model.safetensors.gz"))


def test_what_safetensors_cannot_store_is_refused_naming_the_key(tmp_path):
    writer = SafetensorsWriter(tmp_path / "one.safetensors")
    with pytest.raises(ConfigError) as caught:
        writer.layout({"a": TensorMeta((1,), "float32"), "__metadata__": TensorMeta((1,), "float32")})
    assert str(caught.value) == (
        "cannot write '__metadata__' to safetensors: safetensors keeps that name for the file's metadata; rename the tensor"
    )
    with pytest.raises(ConfigError) as caught:
        writer.begin({"a": TensorMeta((1,), "float32"), "z": TensorMeta((2,), torch.complex64)})
    assert str(caught.value) == "cannot write 'z' to safetensors: safetensors cannot store dtype complex64"
    assert not (tmp_path / "one.safetensors").exists()


# -- metadata carried from the source ---------------------------------------------------


def test_the_source_index_total_size_is_not_carried_but_a_given_one_is(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    save_file({"a": TENSORS["a"]}, source / "model-00001-of-00002.safetensors", metadata={"format": "pt", "s": "1"})
    save_file({"d": TENSORS["d"]}, source / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {"a": "model-00001-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 28, "i": "2"}, "weight_map": weight_map}))
    opened = open_source(source)
    assert opened.metadata["total_size"] == "28"
    writer = SafetensorsWriter(tmp_path / "out.safetensors", metadata={"run": "r"})
    writer.carry(opened)
    assert writer.metadata == {"format": "pt", "s": "1", "i": "2", "run": "r"}
    writer = SafetensorsWriter(tmp_path / "out.safetensors", metadata={"total_size": "mine"})
    writer.carry(opened)
    assert writer.metadata == {"format": "pt", "s": "1", "i": "2", "total_size": "mine"}


# -- raw copies placed on the source's page offset --------------------------------------


def _raw_copy(tmp_path: Path, source_offsets: dict[str, int]) -> tuple[Path, int]:
    """Write a and d (d copied raw from a file of its bytes) with these source offsets; the file and its data start."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(TENSORS["d"].numpy().tobytes())
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path)
    writer.source_offsets = source_offsets
    writer.begin(_metas({"a": TENSORS["a"], "d": TENSORS["d"]}))
    writer.write("a", TENSORS["a"])
    assert writer.write_raw("d", [RawSpan(blob, 0, 20)]) is True
    writer.finish()
    header, _ = _header(path)
    assert torch.equal(load_file(path)["d"], TENSORS["d"])
    return path, 8 + len(header)


@pytest.mark.parametrize("source", [8, 4096 + 1000, 3 * 4096 + 8, 4096 * 7 + 4088])
def test_a_raw_copied_tensor_keeps_its_offset_within_a_page(tmp_path, source):
    _, start = _raw_copy(tmp_path, {"d": source})
    assert (start + 8) % mmap.PAGESIZE == source % mmap.PAGESIZE  # d begins 8 bytes into the data
    assert start % 8 == 0
    assert start - 8 - len(_unpadded(tmp_path / "out.safetensors")) < mmap.PAGESIZE


def _unpadded(path: Path) -> bytes:
    return _header(path)[0].rstrip(b" ")


def test_an_offset_that_breaks_the_8_byte_rule_is_not_followed(tmp_path):
    """A source offset of 8k + 3 cannot be kept with the data section on a multiple of 8: padding to 8 only."""
    path, start = _raw_copy(tmp_path, {"d": 4096 + 3})
    assert start == 8 + len(_unpadded(path)) + (-len(_unpadded(path)) % 8)


def test_only_the_first_raw_copied_tensor_sets_the_padding(tmp_path):
    path, start = _raw_copy(tmp_path, {"a": 4096 + 3, "d": 4096 + 16})
    assert start == 8 + len(_unpadded(path)) + (-len(_unpadded(path)) % 8)


# -- a second process joining the layout ------------------------------------------------


def test_a_joined_writer_fills_the_same_files_and_leaves_the_index_to_rank_0(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    expected = _write_all(SafetensorsWriter(alone, metadata={"k": "v"}, shard_size=10), TENSORS)
    folder = tmp_path / "shared"
    folder.mkdir()
    first, second = SafetensorsWriter(folder, metadata={"k": "v"}, shard_size=10), SafetensorsWriter(folder, metadata={"k": "v"}, shard_size=10)
    first.begin(_metas(TENSORS))
    second.join(_metas(TENSORS))
    second.write("d", TENSORS["d"])
    second.write("b", TENSORS["b"])
    first.write("a", TENSORS["a"])
    first.write("c", TENSORS["c"])
    index = folder / "model.safetensors.index.json"
    assert second.finish() == [folder / f.name for f in expected]
    assert not index.exists()
    written = first.finish()
    assert written == [folder / f.name for f in expected]
    for mine, theirs in zip(expected, written):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name


def test_joining_a_layout_that_is_not_there_or_not_the_same(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    with pytest.raises(ExecutionError) as caught:
        SafetensorsWriter(folder, shard_size=10).join(_metas(TENSORS))
    assert str(caught.value) == f"{folder / 'model-00001-of-00003.safetensors'}: cannot open the file rank 0 laid out: No such file or directory"
    first = SafetensorsWriter(folder, shard_size=10)
    first.begin(_metas(TENSORS))
    other = dict(TENSORS, a=torch.tensor([1.5, -2.0, 3.0]))
    with pytest.raises(ExecutionError) as caught:
        SafetensorsWriter(folder, shard_size=10).join(_metas(other))
    assert str(caught.value) == (
        f"{folder / 'model-00001-of-00003.safetensors'}: rank 0 laid it out with another size; do all ranks run the same plan?"
    )
    first.abort()


# -- errors while writing, and closing ---------------------------------------------------


def _full(fd: int) -> None:
    """Point ``fd`` at /dev/full, where every write fails with ENOSPC."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@needs_dev_full
def test_a_file_that_cannot_be_laid_out_is_named(tmp_path):
    path = tmp_path / "full.safetensors"
    path.symlink_to("/dev/full")
    writer = SafetensorsWriter(path)
    with pytest.raises(ExecutionError) as caught:
        writer.begin(_metas(TENSORS))
    assert str(caught.value) == f"{path}: cannot lay out the file: No space left on device"
    writer.abort()


@needs_dev_full
def test_write_errors_name_the_file_the_key_and_the_source(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(TENSORS["d"].numpy().tobytes())
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path)
    writer.begin(_metas(TENSORS))
    _full(writer._fds[0])
    with pytest.raises(ExecutionError) as caught:
        writer.write("b", TENSORS["b"])
    assert str(caught.value) == f"{path}: cannot write 'b': No space left on device"
    with pytest.raises(ExecutionError) as caught:
        writer.write_raw("d", [RawSpan(blob, 0, 20)])
    assert str(caught.value) == f"{path}: cannot copy 'd' from {blob}: No space left on device"
    writer.abort()


def test_finish_and_abort_close_every_file(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for end in ("finish", "abort"):
        writer = SafetensorsWriter(folder, shard_size=10)
        writer.begin(_metas(TENSORS))
        fds = list(writer._fds)
        assert len(fds) == 3
        if end == "finish":
            for key, tensor in TENSORS.items():
                writer.write(key, tensor)
        getattr(writer, end)()
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert writer._fds == []


def test_two_shards_plan_their_index_and_one_file_plans_none(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    tensors = {"a": TENSORS["a"], "d": TENSORS["d"]}
    planned = SafetensorsWriter(folder, shard_size=10).layout(_metas(tensors))
    files = _write_all(SafetensorsWriter(folder, shard_size=10), tensors)
    assert planned == [PlannedFile(f.name, keys, f.stat().st_size) for f, keys in zip(files, [["a"], ["d"], []])]
    one = tmp_path / "one.safetensors"
    planned = SafetensorsWriter(one, shard_size=10).layout(_metas(tensors))
    assert planned == [PlannedFile("one.safetensors", ["a", "d"], _write_all(SafetensorsWriter(one), tensors)[0].stat().st_size)]


def test_files_are_created_readable_by_all_and_writable_by_the_owner(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "one.safetensors"
    _write_all(SafetensorsWriter(path), TENSORS)
    assert path.stat().st_mode & 0o777 == 0o644 & ~umask


def test_writeback_starts_when_the_bytes_written_reach_the_stretch(tmp_path, monkeypatch):
    """Every 14 bytes here: a (8) and b (6) make 14, so their range is written back; c (4) waits."""
    from statebridge.writers import safetensors as module

    calls: list[tuple[int, int]] = []
    real = module.start_writeback
    monkeypatch.setattr(module, "WRITEBACK_EVERY", 14)
    monkeypatch.setattr(module, "start_writeback", lambda fd, offset, length: (calls.append((offset, length)), real(fd, offset, length))[1])
    path = tmp_path / "one.safetensors"
    writer = SafetensorsWriter(path)
    writer.begin(_metas(TENSORS))
    start = 8 + len(_header_of(writer))
    writer.write("b", TENSORS["b"])  # at start + 8
    writer.write("a", TENSORS["a"])  # at start
    writer.write("c", TENSORS["c"])
    assert calls == [(start, 14)]
    writer.write("d", TENSORS["d"])  # 4 + 20 = 24 more: c's and d's range, from c's offset
    assert calls == [(start, 14), (start + 14, 24)]
    writer.finish()
    calls.clear()
    writer = SafetensorsWriter(tmp_path / "nodurable.safetensors")
    writer.durable = False
    _write_all(writer, TENSORS)
    assert calls == []


def test_tensors_that_fill_the_shard_size_exactly_stay_in_one_file(tmp_path):
    folder = tmp_path / "exact"
    folder.mkdir()
    tensors = {"b": TENSORS["b"], "c": TENSORS["c"]}  # 6 + 4 bytes
    assert _write_all(SafetensorsWriter(folder, shard_size=10), tensors) == [folder / "model.safetensors"]
    assert list(load_file(folder / "model.safetensors")) == ["b", "c"]
