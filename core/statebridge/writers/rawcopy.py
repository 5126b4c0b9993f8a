"""Byte-range copies between files without passing the data through Python objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

_CHUNK = 64 * 1024 * 1024


def copy_range(source: Path, src_offset: int, dest: BinaryIO, dest_offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``source`` at ``src_offset`` into ``dest`` at ``dest_offset``.

    Uses ``os.copy_file_range`` (in-kernel, reflink-capable), then
    ``os.sendfile``, then a buffered loop, whichever the platform supports.
    """
    dest_fd = dest.fileno()
    with open(source, "rb") as src:
        src_fd = src.fileno()
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < length:
                    n = os.copy_file_range(src_fd, dest_fd, min(length - done, _CHUNK), src_offset + done, dest_offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass  # cross-device or unsupported filesystem: fall through
        if done < length:
            os.lseek(dest_fd, dest_offset + done, os.SEEK_SET)
            src.seek(src_offset + done)
            while done < length:
                chunk = src.read(min(length - done, _CHUNK))
                if not chunk:
                    raise OSError(f"{source}: unexpected end of file while copying bytes")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dest_fd, view) :]
                done += len(chunk)
