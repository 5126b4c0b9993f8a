"""The torch writer byte for byte: the records of the archive, their alignment, exact errors, and what it leaves behind.

Written against the mutants of ``writers/torch_file.py`` that the suite let live (docs/testing.md):
``torch.load`` is forgiving (it reads an archive whose records are not aligned, and never
looks at ``.storage_alignment``), so these tests read the zip itself.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from statebridge.errors import ConfigError, ExecutionError
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.torch_file import TorchWriter


def _write(path: Path, state: dict[str, torch.Tensor]) -> TorchWriter:
    writer = TorchWriter(path)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    for key, value in state.items():
        writer.write(key, value)
    assert writer.finish() == [path]
    return writer


def _saved(state: dict[str, torch.Tensor]) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return zipfile.ZipFile(io.BytesIO(buffer.getvalue()))


STATE = {
    "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "h": torch.arange(5, dtype=torch.float16),
    "u": torch.arange(3, dtype=torch.int32).to(torch.uint16),  # an untyped storage: _rebuild_tensor_v3
    "e": torch.zeros(0, 4),
    "b": torch.tensor([True, False, True]),
}


def test_every_record_is_torch_saves_own_and_data_starts_on_a_64_byte_boundary(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    _write(path, STATE)
    ours, theirs = zipfile.ZipFile(path), _saved(STATE)
    assert ours.read("archive/.format_version") == b"1"
    assert ours.read("archive/.storage_alignment") == b"64"
    assert ours.read("archive/byteorder") == sys.byteorder.encode()
    assert ours.read("archive/data.pkl") == theirs.read("archive/data.pkl")
    for i, value in enumerate(STATE.values()):
        assert ours.read(f"archive/data/{i}") == value.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert ours.read(f"archive/data/{i}") == theirs.read(f"archive/data/{i}")
    raw = path.read_bytes()
    for info in ours.infolist():
        # the local header: 30 bytes, the name, then the extra field torch pads with
        name_len, extra_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"), int.from_bytes(
            raw[info.header_offset + 28 : info.header_offset + 30], "little"
        )
        start = info.header_offset + 30 + name_len + extra_len
        assert start % 64 == 0, info.filename
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert list(loaded) == list(STATE)
    for key, value in STATE.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_storages_are_numbered_in_the_announced_order_whatever_the_arrival(tmp_path: Path) -> None:
    state = {"a": torch.ones(2), "b": torch.full((3,), 2.0), "c": torch.full((1,), 3.0)}
    path = tmp_path / "m.pt"
    writer = TorchWriter(path)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    for key in ("c", "a", "b"):
        writer.write(key, state[key])
    writer.finish()
    archive = zipfile.ZipFile(path)
    assert archive.read("archive/data/0") == state["a"].numpy().tobytes()
    assert archive.read("archive/data/1") == state["b"].numpy().tobytes()
    assert archive.read("archive/data/2") == state["c"].numpy().tobytes()
    assert archive.read("archive/data.pkl") == _saved(state).read("archive/data.pkl")


def test_a_view_into_the_middle_of_a_storage_is_written_from_its_own_first_byte(tmp_path: Path) -> None:
    base = torch.arange(10, dtype=torch.float32)
    state = {"v": base[3:7], "t": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "one": base[1:3]}
    path = tmp_path / "m.pt"
    _write(path, state)
    archive = zipfile.ZipFile(path)
    assert archive.read("archive/data/0") == torch.tensor([3.0, 4.0, 5.0, 6.0]).numpy().tobytes()
    assert archive.read("archive/data/1") == state["t"].contiguous().numpy().tobytes()
    assert archive.read("archive/data/2") == torch.tensor([1.0, 2.0]).numpy().tobytes()  # storage offset 1
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["v"], base[3:7]) and torch.equal(loaded["t"], state["t"]) and torch.equal(loaded["one"], base[1:3])


def test_a_missing_folder_is_made(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "m.pt"
    _write(path, {"w": torch.ones(2)})
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


def test_exact_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    writer = TorchWriter(path)
    with pytest.raises(ExecutionError) as e:
        writer.finish()
    assert str(e.value) == f"{path}: finish() before begin()"
    writer.begin({"a": TensorMeta((2,), torch.float32), "b": TensorMeta((3,), torch.int64), "c": TensorMeta((1,), torch.int8)})
    with pytest.raises(ExecutionError) as e:
        writer.begin({"a": TensorMeta((2,), torch.float32)})
    assert str(e.value) == f"{path}: begin() was called twice"
    with pytest.raises(ExecutionError) as e:
        writer.write("b", torch.ones(3))
    assert str(e.value) == f"{path}: 'b' is float32[3] but begin() announced int64[3]"
    with pytest.raises(ExecutionError) as e:
        writer.write("b", torch.ones(2, dtype=torch.int64))
    assert str(e.value) == f"{path}: 'b' is int64[2] but begin() announced int64[3]"
    writer.write("a", torch.ones(2))
    with pytest.raises(ExecutionError) as e:
        writer.finish()
    assert str(e.value) == f"{path}: 2 announced tensors were never written, e.g. 'b'"
    writer.abort()


def test_a_dtype_torch_cannot_save_is_refused_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dtype whose pickling torch refuses: ``begin`` says so for that key before anything is written."""
    import statebridge.writers.torch_file as torch_file

    real = torch_file._tensor_ref

    def refusing(meta: TensorMeta, storage_key: str):  # type: ignore[no-untyped-def]
        if meta.dtype.torch == torch.int16:
            raise RuntimeError("no storage for it")
        return real(meta, storage_key)

    monkeypatch.setattr(torch_file, "_tensor_ref", refusing)
    path = tmp_path / "x.pt"
    writer = TorchWriter(path)
    with pytest.raises(ConfigError) as e:
        writer.begin({"a": TensorMeta((2,), torch.float32), "s": TensorMeta((2,), torch.int16)})
    assert str(e.value) == "cannot write 's' to torch: torch cannot save a int16 tensor: no storage for it"
    assert not path.exists()


def test_finish_fsyncs_the_file_it_wrote_and_closes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    synced: list[tuple[int, int]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    writer = TorchWriter(path)
    writer.begin({"w": TensorMeta((3,), torch.float32)})
    writer.write("w", torch.ones(3))
    handle = writer._file
    writer.finish()
    st = path.stat()
    assert synced == [(st.st_ino, st.st_size)]  # once, the whole archive, flushed before
    assert handle is not None and handle.closed
    assert writer._file is None and writer._zip is None
    writer.durable = False
    synced.clear()
    other = TorchWriter(tmp_path / "n.pt")
    other.durable = False
    other.begin({"w": TensorMeta((3,), torch.float32)})
    other.write("w", torch.ones(3))
    other.finish()
    assert synced == []
    assert (tmp_path / "n.pt").read_bytes() == path.read_bytes()


def test_abort_finalises_the_archive_and_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    writer = TorchWriter(path)
    writer.begin({"w": TensorMeta((3,), torch.float32), "v": TensorMeta((2,), torch.float32)})
    writer.write("w", torch.ones(3))
    handle = writer._file
    writer.abort()
    assert handle is not None and handle.closed
    assert writer._file is None and writer._zip is None
    archive = zipfile.ZipFile(path)  # finalised: its central directory is there
    assert archive.read("archive/data/0") == torch.ones(3).numpy().tobytes()
    assert "archive/data.pkl" not in archive.namelist()
    writer.abort()  # twice is fine


def test_the_base_writer_keeps_metadata_and_shard_size_and_abort_before_begin_is_fine(tmp_path: Path) -> None:
    writer = TorchWriter(tmp_path / "m.pt", metadata={"a": "b"}, shard_size=5)
    assert writer.metadata == {"a": "b"} and writer.shard_size == 5
    writer.abort()  # nothing opened: nothing to close
    assert not (tmp_path / "m.pt").exists()


def test_a_huge_tensor_is_announced_without_allocating_it(tmp_path: Path) -> None:
    """``begin`` asks torch how it pickles each tensor: on the meta device, never allocating 4 TB."""
    writer = TorchWriter(tmp_path / "m.pt")
    writer.begin({"huge": TensorMeta((2**40,), torch.float32)})
    writer.abort()


def test_a_finish_that_failed_to_sync_cannot_be_finished_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    writer = TorchWriter(path)
    writer.begin({"w": TensorMeta((2,), torch.float32)})
    writer.write("w", torch.ones(2))

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        writer.finish()
    with pytest.raises(ExecutionError) as e:
        writer.finish()
    assert str(e.value) == f"{path}: finish() before begin()"
    writer.abort()
