"""Atomic commits: everything is written to a temporary sibling and renamed into place on success.

On any failure, including Ctrl-C, the target is left exactly as it was (absent
or untouched) and the temporary sibling is removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(target: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``target`` on the same filesystem, so the final rename is atomic."""
    return target.parent / f".{target.name}.statebridge-{tag}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_target(target: str | os.PathLike[str], folder: bool) -> Iterator[Path]:
    """Yield a staging path (a file path, or a fresh folder) that becomes ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    if folder:
        staging.mkdir()
    try:
        yield staging
        _fsync(staging)
        _swap_into_place(staging, target)
    except BaseException:
        _remove(staging)
        raise


def _swap_into_place(staging: Path, target: Path) -> None:
    if staging.is_dir() and target.exists():
        old = staging_path(target, "old")
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        _remove(old)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)


def _fsync(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.iterdir()):
            _fsync(child)
        _fsync_dir(path)
    elif path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
