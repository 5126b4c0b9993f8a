"""Atomic commits: everything is written to a hidden sibling and swapped into place on success.

Guarantees, for a file or a shard folder:

- **Nothing is deleted before the new version is in place.**  The new version is written
  (and fsynced) completely in the staging sibling first; it then replaces the target in one
  step: ``rename`` for a file over a file, an atomic exchange
  (``renameat2(RENAME_EXCHANGE)``) otherwise, after which the sibling holds the previous
  version and is removed.  Where the file system cannot exchange, the previous target is
  renamed aside, the new one renamed in (the old one put back if that fails), and only then
  is the old one removed.  A staging path that is gone at commit (removed inside a
  :func:`transaction` block) is an error that leaves the target alone.
- **Failures leave the target as it was.**  On any error, Ctrl-C or SIGTERM the staging
  sibling is removed (a second signal cannot cut that short) and the target is untouched.
  An I/O error (a full disk, a read-only folder, ``ulimit -f``) becomes one
  :class:`~statebridge.errors.ExecutionError` line naming the target.
- **Leftovers are recognisable and cleaned up.**  Staging names are
  ``.<stem>~statebridge-<tag>-<host>-<pid>-<id><suffix>``: hidden, with the target's suffix
  (so a writer chooses its format from ``tx.path`` as from the target), and with the host
  and process that made them.  A process killed outright (SIGKILL, power loss) leaves at most
  such a sibling; the next transaction in that folder (and the next bandwidth probe there)
  removes every leftover whose process is gone on this host, and, after a crash between the
  two renames of the fallback swap, puts the previous target back.  Leftovers of live
  processes or of other hosts are never touched.
- **One writer at a time.**  A transaction refuses a target that another live process (or an
  open transaction of this one) is staging: two runs into one target never race.

Sources are never written: readers open them read-only.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, ExecutionError, StatebridgeError

if TYPE_CHECKING:
    from .targets import TargetPolicy

#: a short tag of this machine in staging names, so a leftover is judged only where its process ran
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(
    r"^\.(?P<stem>[^~]*)~statebridge-(?P<tag>tmp|old|probe)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{12}"
    r"(?P<suffix>(?:\..*)?)$"
)
#: the test hook of :func:`pause_point`
PAUSE_ENV = "STATEBRIDGE_PAUSE_AT"


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C) arrived during a transaction; raised so the staging files are cleaned up."""


def staging_path(target: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``target`` on the same file system (so the final rename is atomic).

    It keeps the target's suffix (``Path.suffix`` of both is the same), so the format a
    writer infers from the name is the target's.  Dots, ``%`` and ``~`` in the stem are
    escaped so that no other dot can pose as a suffix and the target's name can be read back.
    """
    stem = target.stem.replace("%", "%25").replace(".", "%2E").replace("~", "%7E")
    return target.parent / f".{stem}~statebridge-{tag}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}{target.suffix}"


def _target_name(match: re.Match[str]) -> str:
    stem = match["stem"].replace("%7E", "~").replace("%2E", ".").replace("%25", "%")
    return stem + match["suffix"]


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
    filesystem can), or empty when there is none, and has the target's suffix.  Change
    it freely, or write a run's output there; when the block ends without an exception
    it replaces the target atomically, otherwise it is discarded and the target was
    never touched::

        with statebridge.transaction("model.safetensors") as tx:
            statebridge.run("ckpt/", steps, tx.path)
            check(tx.path)                  # raise to keep model.safetensors as it was

    A run into ``tx.path`` applies the target policy to ``tx.path``: it replaces a copy of
    a statebridge output, but not a copy of files statebridge did not write (unless
    ``overwrite=True``).
    """
    target = Path(target)
    is_folder = target.is_dir() if folder is None else folder
    with atomic_target(target, folder=is_folder, durable=durable) as staging:
        if copy and target.exists():
            _copy_tree(target, staging)
        yield Transaction(target, staging)


@contextmanager
def atomic_target(
    target: str | os.PathLike[str], folder: bool, durable: bool = True, policy: TargetPolicy | None = None
) -> Iterator[Path]:
    """Yield a staging path (an empty file, or an empty folder) that becomes ``target`` on success.

    ``durable``: fsync the staged files before the swap and the parent folder after it, so the
    commit survives a power cut; without it the swap is still atomic for every process, as a
    ``cp`` is, but the kernel writes the data back when it likes.  ``policy``: the run's
    :class:`~statebridge.execute.targets.TargetPolicy`, checked before the staging path is made and
    again just before the swap (the target may have changed meanwhile).
    """
    target = Path(target).absolute()
    with _terminate_as_interrupt():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sweep(target.parent)
            if policy is not None:
                policy.check()
            staging = staging_path(target)
            if folder:
                staging.mkdir()
            else:
                os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as e:
            raise _write_error(target, e, staging_path(target)) from None
        try:
            refuse_if_busy(target, own=staging)
            yield staging
            if policy is not None:
                policy.check(own=staging)
            if durable:
                _fsync(staging)
            pause_point("commit")
            with _shielded():
                _swap_into_place(staging, target, durable)
        except BaseException as e:
            with _shielded():
                _remove(staging)
            if isinstance(e, OSError):
                raise _write_error(target, e, staging) from None
            if isinstance(e, StatebridgeError) and str(staging) in str(e):
                named = copy.copy(e)  # a writer's message names the hidden staging path: name the target
                named.args = (str(e).replace(str(staging), str(target)),)
                raise named from None
            raise


def _write_error(target: Path, error: OSError, staging: Path) -> ExecutionError:
    """One line for a failed write, naming the target (not its hidden staging sibling) and the file at fault."""
    filename = os.fsdecode(error.filename) if isinstance(error.filename, (str, bytes, os.PathLike)) else None
    if filename is not None and filename.startswith(str(staging.parent / staging.name.split("~statebridge-")[0])):
        filename = None  # the staging sibling, or a file in it: the target says it
    where = f" ({filename})" if filename and filename != str(target) else ""
    return ExecutionError(
        f"cannot write {target}: {error.strerror or error}{where}; nothing was committed and the target is as it was"
    )


def refuse_if_busy(target: Path, own: Path | None = None) -> None:
    """Raise :class:`~statebridge.errors.ConfigError` if a live process is staging ``target`` (other than ``own``)."""
    target = Path(target).absolute()
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = _LEFTOVER.match(sibling.name)
        if (
            match
            and match["tag"] == "tmp"
            and _target_name(match) == target.name
            and sibling != own
            and not _gone(match)
        ):
            who = "an open transaction of this process" if int(match["pid"]) == os.getpid() else f"process {match['pid']}"
            raise ConfigError(
                f"another statebridge run ({who}) is writing {target}; wait for it to finish or choose another target"
            )


def sweep(folder: Path) -> list[Path]:
    """Remove what transactions and bandwidth probes in ``folder`` left behind when their process died.

    Only names statebridge makes (see :func:`staging_path`) of processes that are gone on
    this host are touched.  If a target is missing and a dead process's ``old`` sibling of
    it exists (a crash between the two renames of the fallback swap), that sibling is the
    previous target and is put back.  Returns what was removed.
    """
    removed: list[Path] = []
    try:
        siblings = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = _LEFTOVER.match(sibling.name)
        if not match or not _gone(match):
            continue
        target = sibling.parent / _target_name(match)
        try:
            if match["tag"] == "old" and not os.path.lexists(target):
                os.rename(sibling, target)
                continue
        except OSError:
            continue
        _remove(sibling)
        if not os.path.lexists(sibling):
            removed.append(sibling)
    return removed


def _gone(match: re.Match[str]) -> bool:
    """Whether the process that made a leftover is gone (never judged for another host's leftovers)."""
    if match["host"] != HOST:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def pause_point(name: str) -> None:
    """Stop here when ``$STATEBRIDGE_PAUSE_AT`` names this point: a hook for tests that interrupt runs.

    The process says where it stopped on stderr (``statebridge: paused at NAME``) and waits
    for a line on stdin (or for stdin to close); meanwhile a test can kill it, signal it or
    change its files at a moment it controls, with no timing involved.  Each point pauses
    once per process.  Points: ``probe`` (the bandwidth probe's scratch file is written),
    ``writing`` (the first group of a run is written), ``commit`` (the staged version is
    complete and checked, just before the swap), ``swap`` (the previous target is renamed
    aside, the new one not yet in: the fallback swap only).
    """
    if os.environ.get(PAUSE_ENV) != name or name in _paused:
        return
    _paused.add(name)
    sys.stderr.write(f"statebridge: paused at {name}\n")
    sys.stderr.flush()
    sys.stdin.readline()


_paused: set[str] = set()


class _Signals:
    """SIGTERM/SIGINT while a transaction is open: an exception, except while cleaning up or swapping."""

    shielded = 0
    pending: int | None = None


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and Ctrl-C into :class:`Interrupted` while a transaction is open (main thread only).

    A signal that arrives while the staging sibling is being removed or swapped in waits
    until that is done, and is delivered again when the transaction is over.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        if _Signals.shielded:
            _Signals.pending = signum
            return
        raise Interrupted(f"terminated by signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signum, _Signals.pending = _Signals.pending, None
        if signum is not None:
            signal.raise_signal(signum)


@contextmanager
def _shielded() -> Iterator[None]:
    """Hold signals back (see :func:`_terminate_as_interrupt`) until the block is done."""
    _Signals.shielded += 1
    try:
        yield
    finally:
        _Signals.shielded -= 1


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
    """Put the complete ``staging`` in ``target``'s place; the previous target is removed only afterwards."""
    if not os.path.lexists(staging):
        raise ExecutionError(
            f"cannot commit {target}: its staged version {staging.name} is gone (removed inside the "
            "transaction?); the target is as it was"
        )
    if not os.path.lexists(target) or (_is_plain_file(staging) and _is_plain_file(target)):
        os.replace(staging, target)  # one rename: the target is the old file or the new one, never neither
    elif _exchange(staging, target):
        _remove(staging)  # now holds the previous target
    else:
        old = staging_path(target, "old")
        os.rename(target, old)
        pause_point("swap")
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    if durable:
        _fsync_one(target.parent)


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


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
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
