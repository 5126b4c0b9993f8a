"""Raw byte-range copies, checked where mutation testing found the suite blind (docs/testing.md, Score).

A source shorter than the range asked for is one error naming it (never a silent short copy,
never a loop); the kernel path copies chunk after chunk without falling back to Python; the
early-writeback call is built so that offsets past 4 GiB reach the kernel.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from statebridge.writers import rawcopy


def _dest(tmp_path: Path, size: int) -> int:
    fd = os.open(tmp_path / "dest.bin", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "pread"])
def test_a_source_shorter_than_the_range_is_an_error_naming_it(tmp_path, monkeypatch, kernel):
    source = tmp_path / "short.bin"
    source.write_bytes(bytes(range(100)))
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    fd = _dest(tmp_path, 200)
    try:
        with pytest.raises(OSError) as caught:
            rawcopy.copy_range(source, 50, fd, 10, 100)
    finally:
        os.close(fd)
    assert str(caught.value) == f"{source}: unexpected end of file while copying bytes"
    assert (tmp_path / "dest.bin").read_bytes()[10:60] == bytes(range(50, 100))  # what there was, at its offset


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range")
def test_the_kernel_copies_every_chunk_and_python_reads_nothing(tmp_path, monkeypatch):
    """Chunks of one byte: each call copies one byte, which is progress, not the end of the file."""
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 4)
    monkeypatch.setattr(rawcopy, "_CHUNK", 1)
    preads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: (preads.append(n), real_pread(fd, n, offset))[1])
    fd = _dest(tmp_path, 1024)
    try:
        rawcopy.copy_range(source, 100, fd, 0, 37)
    finally:
        os.close(fd)
    assert (tmp_path / "dest.bin").read_bytes()[:37] == source.read_bytes()[100:137]
    assert preads == []


def test_a_copy_warns_about_nothing(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 64)
    fd = _dest(tmp_path, 64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rawcopy.copy_range(source, 0, fd, 0, 64)
    finally:
        os.close(fd)
    assert (tmp_path / "dest.bin").read_bytes() == b"x" * 64


def test_early_writeback_takes_offsets_past_two_gib(tmp_path):
    """``sync_file_range`` takes 64-bit offsets: without its argument types ctypes passes a C int, and 3 GiB
    turns negative (EINVAL)."""
    function = rawcopy._sync_file_range()
    if function is None:
        pytest.skip("no sync_file_range on this system")
    fd = os.open(tmp_path / "sparse.bin", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"x" * 4096, 3 << 30)
        assert function(fd, 3 << 30, 4096, rawcopy._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


def test_a_short_pwrite_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """``pwrite`` may write less than asked (a signal, a file size limit): the rest follows at the right offset."""
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, data[:7], offset))
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        rawcopy.write_at(fd, bytes(range(100)), 50)
    finally:
        os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == bytes(50) + bytes(range(100))
