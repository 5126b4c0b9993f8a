"""Atomic commits: everything is written to a hidden sibling and swapped into place on success.

Guarantees, for a file or a shard folder:

- On success the target is replaced in one step: ``rename`` for files, an atomic
  exchange (``renameat2(RENAME_EXCHANGE)``) for folders, so no reader ever sees a
  half-written target and there is no moment without one.
- On any error, Ctrl-C or SIGTERM the staging sibling is removed and the target
  (absent or pre-existing) is exactly as it was.
- A process killed outright (SIGKILL, power loss) leaves at most a hidden
  ``.<name>.statebridge-*`` sibling beside an untouched target; the next
  transaction on that target removes it (and, after a crash inside the
  non-atomic fallback swap, restores the previous target from it).

Sources are never written: readers open them read-only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_MARK = "statebridge"
_STAGING = re.compile(rf"^\.(?P<name>.+)\.{_MARK}-(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]{{12}}$")


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived during a transaction; raised so the staging files are cleaned up."""


def staging_path(target: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``target`` on the same filesystem, so the final rename is atomic."""
    return target.parent / f".{target.name}.{_MARK}-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@dataclass
class Transaction:
    """An open transaction: write to :attr:`path`; it becomes :attr:`target` on success."""

    target: Path
    path: Path


@contextmanager
def transaction(
    target: str | os.PathLike[str], *, folder: bool | None = None, copy: bool = True, durable: bool = True
) -> Iterator[Transaction]:
    """Edit ``target`` (a checkpoint file or folder) all-or-nothing, copy-on-write.

    ``tx.path`` starts as a copy of the existing target (sharing blocks where the
    filesystem can), or empty when there is none.  Change it freely; when the
    block ends without an exception it replaces the target atomically, otherwise
    it is discarded and the target was never touched::

        with statebridge.transaction("ckpt/") as tx:
            statebridge.run("ckpt/", steps, tx.path)      # or edit files in tx.path
    """
    target = Path(target)
    is_folder = target.is_dir() if folder is None else folder
    with atomic_target(target, folder=is_folder, durable=durable) as staging:
        if copy and target.exists():
            _copy_tree(target, staging)
        yield Transaction(target, staging)


@contextmanager
def atomic_target(target: str | os.PathLike[str], folder: bool, durable: bool = True) -> Iterator[Path]:
    """Yield a staging path (a file path, or a fresh folder) that becomes ``target`` on success.

    ``durable``: fsync the staged files before the rename and the parent folder after it, so the
    commit survives a power cut; without it the swap is still atomic for every process, as a
    ``cp`` is, but the kernel writes the data back when it likes.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = staging_path(target)
    with _terminate_as_interrupt():
        try:
            if folder:
                staging.mkdir()
            yield staging
            if durable:
                _fsync(staging)
            _swap_into_place(staging, target, durable)
        except BaseException:
            _remove(staging)
            raise


def recover(target: Path) -> list[Path]:
    """Clean up after transactions on ``target`` whose process died; return what was removed.

    Staging siblings of dead processes are deleted.  If the target is missing
    but a dead process's ``old`` sibling exists (a crash between the two renames
    of the fallback swap), that sibling is the previous target and is put back.
    """
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in sorted(target.parent.iterdir()):
        match = _STAGING.match(sibling.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])):
            continue
        if match["tag"] == "old" and not target.exists():
            os.replace(sibling, target)
            continue
        _remove(sibling)
        removed.append(sibling)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into an exception while a transaction is open (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _swap_into_place(staging: Path, target: Path, durable: bool) -> None:
    if staging.is_dir() and target.exists():
        if _exchange(staging, target):
            _remove(staging)  # now holds the previous target
        else:
            old = staging_path(target, "old")
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)
                raise
            _remove(old)
    else:
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    if durable:
        _fsync_one(target.parent)


def _copy_tree(source: Path, destination: Path) -> None:
    """Copy a file or folder's contents into ``destination`` (blocks shared where the filesystem can)."""
    if source.is_dir():
        shutil.copytree(source, destination, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, destination)


def _fsync(path: Path) -> None:
    """fsync a file, or a folder's files and then the folder itself."""
    if path.is_dir():
        for child in sorted(path.iterdir()):
            _fsync(child)
    if path.exists():
        _fsync_one(path)


def _fsync_one(path: Path) -> None:
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
