"""Durability and raw copies, checked by their effects on the staged files, not by "something happened".

Each test here was written against a one-line bug that the older tests let through (docs/testing.md
lists them): fsync or writeback made no-ops, ``copy_file_range`` never used, the pread fallback
writing at the wrong offset.  Calls are observed with recording wrappers around ``os`` functions
(spies on statebridge's own calls; the real function still runs), and files are identified by
what the descriptor points at (``/proc/self/fd``), so the tests see *which* files were synced.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch

import statebridge as sb
from statebridge.readers import open_source
from statebridge.writers import rawcopy
from statebridge.writers import safetensors as sb_safetensors
from statebridge.writers.gguf import GGUFWriter
from statebridge.writers.safetensors import SafetensorsWriter
from statebridge.writers.torch_file import TorchWriter

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc to name a file descriptor")

QKV = sb.Concat(
    inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"], output="model.layers.*.self_attn.qkv_proj.weight"
)


def fd_path(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    """Every path ``os.fsync`` is called on, in order (the real fsync still runs)."""
    calls: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd_path(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def files_of(target: Path) -> list[Path]:
    return sorted(target.iterdir()) if target.is_dir() else [target]


# -- fsync: which files, and when --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["shards", "file"])
def test_a_durable_run_fsyncs_every_staged_file_the_staging_folder_and_then_the_parent(tmp_path, llama_file, fsynced, layout):
    target = (tmp_path / "out" / ("ckpt" if layout == "shards" else "model.safetensors")).resolve()
    sb.run(llama_file, [sb.Cast(pattern="**.mlp.**", dtype="bf16")], target, shard_size=60_000, progress=False)
    written = files_of(target)
    prefix = f".{target.stem}~statebridge-tmp-"  # staging_path: hidden, named after the target, suffix kept
    staged = [p for p in fsynced if p.name.startswith(prefix) or p.parent.name.startswith(prefix)]
    assert staged, fsynced
    if layout == "shards":
        assert len(written) > 2 and (target / "model.safetensors.index.json") in written
        staging = next(p for p in staged if p.parent == target.parent)
        inside = [p for p in staged if p.parent == staging]
        assert {p.name for p in inside} == {p.name for p in written}  # every shard and the index
        last_file = max(i for i, p in enumerate(fsynced) if p.parent == staging)
        assert fsynced.index(staging) > last_file  # the folder after its files: their names are durable too
        before_swap = fsynced.index(staging)
    else:
        (staging,) = set(staged)
        before_swap = max(i for i, p in enumerate(fsynced) if p == staging)
    # after the swap, the parent folder (which now names the new target) is fsynced
    assert target.parent in fsynced[before_swap + 1 :], fsynced


def test_a_run_without_durability_fsyncs_nothing_and_writes_the_same_bytes(tmp_path, llama_file, fsynced):
    steps = [sb.Cast(pattern="**.mlp.**", dtype="bf16")]
    sb.run(llama_file, steps, tmp_path / "durable", shard_size=60_000, progress=False)
    fsynced.clear()
    sb.run(llama_file, steps, tmp_path / "fast", shard_size=60_000, progress=False, durable=False)
    assert fsynced == []
    assert [(p.name, p.read_bytes()) for p in files_of(tmp_path / "fast")] == [
        (p.name, p.read_bytes()) for p in files_of(tmp_path / "durable")
    ]


TENSORS = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16)}


@pytest.mark.parametrize(
    ("writer", "target", "shard_size"),
    [(SafetensorsWriter, "one.safetensors", None), (SafetensorsWriter, "shards", 40), (TorchWriter, "t.pt", None), (GGUFWriter, "g.gguf", None)],
    ids=["safetensors", "shards", "torch", "gguf"],
)
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
def test_each_writer_fsyncs_the_files_it_wrote_in_finish(tmp_path, fsynced, writer, target, shard_size, durable):
    path = (tmp_path / target).resolve()
    if shard_size:
        path.mkdir()
    sink = writer(path, shard_size=shard_size)
    sink.durable = durable
    sink.begin({k: sb.TensorMeta.of(v) for k, v in TENSORS.items()})
    for key, tensor in TENSORS.items():
        sink.write(key, tensor)
    assert fsynced == []  # nothing is synced before finish
    files = [f for f in sink.finish() if f.suffix != ".json"]  # the index is written last and synced by the commit
    assert len(files) == (2 if shard_size else 1)
    assert sorted(set(fsynced)) == (sorted(files) if durable else [])


# -- early writeback: asked for, on the right ranges -------------------------------------------


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """Absolute byte ranges of every tensor in a safetensors file."""
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + length])
    header.pop("__metadata__", None)
    return [(8 + length + begin, 8 + length + end) for begin, end in (v["data_offsets"] for v in header.values())]


@pytest.fixture
def writebacks(monkeypatch) -> list[tuple[str, int, int, int]]:
    """Every ``sync_file_range`` call: (file name, offset, length, flags); the real call still runs."""
    calls: list[tuple[str, int, int, int]] = []
    real = rawcopy._SYNC_FILE_RANGE
    if real is None:
        pytest.skip("no sync_file_range on this system")

    def spy(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((fd_path(fd).name, offset, length, flags))
        result = real(fd, offset, length, flags)
        assert result == 0, os.strerror(ctypes_errno())
        return result

    monkeypatch.setattr(rawcopy, "_SYNC_FILE_RANGE", spy)
    return calls


def ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


@pytest.mark.parametrize("steps", [[], [sb.Cast(pattern="**.mlp.**", dtype="bf16")]], ids=["raw-copies", "computed"])
def test_durable_writes_ask_the_kernel_to_write_back_every_range_written(tmp_path, llama_file, writebacks, monkeypatch, steps):
    monkeypatch.setattr(sb_safetensors, "WRITEBACK_EVERY", 1)  # after every tensor
    target = tmp_path / "out"
    sb.run(llama_file, steps, target, shard_size=60_000, progress=False)
    assert writebacks
    assert {flags for *_, flags in writebacks} == {2}  # SYNC_FILE_RANGE_WRITE: start writing, do not wait
    for shard in target.glob("*.safetensors"):
        asked = [(offset, offset + length) for name, offset, length, _ in writebacks if name == shard.name]
        for begin, end in data_ranges(shard):
            assert any(a <= begin and end <= b for a, b in asked), (shard.name, begin, end, asked)
    writebacks.clear()
    sb.run(llama_file, steps, tmp_path / "fast", shard_size=60_000, progress=False, durable=False)
    assert writebacks == []


def test_writeback_waits_until_a_stretch_of_writeback_every_bytes_is_dirty(tmp_path, llama_file, writebacks, monkeypatch):
    every = 50_000
    monkeypatch.setattr(sb_safetensors, "WRITEBACK_EVERY", every)
    sb.run(llama_file, None, tmp_path / "out.safetensors", progress=False)
    size = sum(end - begin for begin, end in data_ranges(tmp_path / "out.safetensors"))
    assert writebacks and all(length >= every for _, _, length, _ in writebacks)
    assert len(writebacks) <= size // every  # not after every tensor


# -- raw copies: copy_file_range, and the pread fallback -----------------------------------------


@pytest.fixture
def copies(monkeypatch) -> list[tuple[str, str, int]]:
    """Every ``os.copy_file_range`` call: (source name, destination name, bytes copied)."""
    calls: list[tuple[str, str, int]] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        copied = real(src, dst, count, offset_src, offset_dst)
        calls.append((fd_path(src).name, fd_path(dst).name, copied))
        return copied

    monkeypatch.setattr(os, "copy_file_range", spy)
    return calls


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range")
def test_raw_copies_go_through_copy_file_range_and_never_through_python(tmp_path, llama_file, copies, monkeypatch):
    preads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: (preads.append(n), real_pread(fd, n, offset))[1])
    fuse = sb.Concat(inputs=[f"layers.*.self_attn.{x}_proj.weight" for x in "qkv"], output="layers.*.self_attn.qkv_proj.weight")
    report = sb.run(llama_file, [sb.Rename(pattern="model.**", to="**"), fuse], tmp_path / "out.safetensors", progress=False)
    metas = open_source(llama_file).metas()
    assert report.stats.tensors_written == 0 and report.stats.tensors_copied_raw == len(metas) - 4  # 2 layers: 6 -> 2
    assert {src for src, _, _ in copies} == {llama_file.name}
    assert all(dst.startswith(".out~statebridge-tmp-") and dst.endswith(".safetensors") for _, dst, _ in copies)  # into the staged file
    assert sum(n for *_, n in copies) == sum(m.nbytes for m in metas.values())
    assert preads == []


def refuse_copy_file_range(after: int = 0):
    """A ``copy_file_range`` that copies the first ``after`` bytes it is asked for, then fails as across devices."""
    real = os.copy_file_range
    done = 0

    def copy(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        nonlocal done
        if done >= after:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        copied = real(src, dst, min(count, after - done), offset_src, offset_dst)
        done += copied
        return copied

    return copy


@pytest.mark.parametrize("target", ["out", "out.safetensors", "out.gguf"])
@pytest.mark.parametrize("after", [0, 1000], ids=["refused", "refused-midway"])
def test_the_pread_fallback_writes_every_byte_at_its_offset(tmp_path, llama_file, monkeypatch, target, after):
    steps = [QKV, sb.Rename(pattern="model.**", to="**")]
    sb.run(llama_file, steps, tmp_path / "kernel" / target, shard_size=70_000, progress=False)
    monkeypatch.setattr(rawcopy, "_CHUNK", 4093)  # many chunks per tensor, none page-aligned
    if hasattr(os, "copy_file_range"):
        monkeypatch.setattr(os, "copy_file_range", refuse_copy_file_range(after))
    report = sb.run(llama_file, steps, tmp_path / "fallback" / target, shard_size=70_000, progress=False)
    assert report.stats.tensors_written == 0  # still raw copies, through pread/pwrite
    kernel, fallback = files_of(tmp_path / "kernel" / target), files_of(tmp_path / "fallback" / target)
    assert [p.name for p in fallback] == [p.name for p in kernel]
    for a, b in zip(kernel, fallback):
        assert a.read_bytes() == b.read_bytes(), a.name
    # and the bytes are the right ones, not only the same as another run's
    source, out = open_source(llama_file), open_source(tmp_path / "fallback" / target)
    for i in range(2):
        fused = torch.cat([source.load(f"model.layers.{i}.self_attn.{x}_proj.weight") for x in "qkv"])
        assert torch.equal(out.load(f"layers.{i}.self_attn.qkv_proj.weight"), fused)
    assert torch.equal(out.load("lm_head.weight"), source.load("lm_head.weight"))


def test_copy_range_places_bytes_at_both_offsets(tmp_path, monkeypatch):
    """The fallback and the kernel path read from ``src_offset`` and write at ``dest_offset``, chunk after chunk."""
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 40)
    monkeypatch.setattr(rawcopy, "_CHUNK", 97)
    for name, copy_file_range in (("kernel", None), ("fallback", refuse_copy_file_range(0)), ("midway", refuse_copy_file_range(300))):
        if copy_file_range is not None:
            monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        dest = tmp_path / f"{name}.bin"
        fd = os.open(dest, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, 3000)
            rawcopy.copy_range(source, 1234, fd, 777, 2000)
        finally:
            os.close(fd)
        data = dest.read_bytes()
        assert data[777:2777] == source.read_bytes()[1234:3234], name
        assert data[:777] == bytes(777) and data[2777:] == bytes(223), name
