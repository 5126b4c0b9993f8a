"""Transactions, checked where mutation testing found the suite blind (docs/testing.md, Score).

Each test pins an effect of ``statebridge.execute.transaction``: the exact error line of a failed
write, the atomic exchange itself, the names the fallback swap gives the previous target, the
pause points, and a sweep that goes on past what it cannot remove.  Failures a root process
cannot provoke for real (another user's process, a file ``rmtree`` cannot delete) are made by a
recording wrapper around the ``os`` call that the real function then runs.
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import statebridge as sb
from statebridge.errors import ConfigError, ExecutionError
from statebridge.execute.transaction import HOST, atomic_target, staging_path, sweep

tx_module = importlib.import_module("statebridge.execute.transaction")

_COMMITTED_NOTHING = "; nothing was committed and the target is as it was"


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _as_dead(path: Path, pid: int) -> Path:
    """``path`` (a staging name of this process) as if process ``pid`` had made it."""
    return path.with_name(path.name.replace(f"-{HOST}-{os.getpid()}-", f"-{HOST}-{pid}-"))


@pytest.mark.parametrize("name", ["v%2E1.safetensors", "a%25b", "x%7Ey.gguf", "%.pt"])
def test_staging_names_of_targets_whose_names_look_escaped_read_back_exactly(tmp_path, name):
    """``%`` is escaped first, so a literal ``%2E`` in a target's name is not read back as a dot."""
    match = tx_module._LEFTOVER.match(staging_path(tmp_path / name).name)
    assert match is not None and tx_module._target_name(match) == name


def _failed_write(tmp_path: Path, filename) -> str:
    """The error line of an ``ENOSPC`` on ``filename`` (a callable of the staging path) inside a file transaction."""
    target = tmp_path / "model.safetensors"
    with pytest.raises(ExecutionError) as caught:
        with atomic_target(target, folder=False) as staging:
            raise OSError(errno.ENOSPC, "No space left on device", *([] if filename is None else [filename(staging)]))
    assert not target.exists() and _hidden(tmp_path) == []
    return str(caught.value)


def test_a_failed_write_names_the_target_and_the_foreign_file_at_fault(tmp_path):
    target = tmp_path / "model.safetensors"
    other = tmp_path / "source.safetensors"
    expected = f"cannot write {target}: No space left on device ({other}){_COMMITTED_NOTHING}"
    assert _failed_write(tmp_path, lambda staging: str(other)) == expected
    assert _failed_write(tmp_path, lambda staging: os.fsencode(other)) == expected  # bytes names too


@pytest.mark.parametrize(
    "filename",
    [
        None,
        lambda staging: str(staging),
        lambda staging: str(staging / "model-00001-of-00002.safetensors"),
        lambda staging: str(staging.parent / "model.safetensors"),
        lambda staging: str(staging_path(staging.parent / "model.safetensors", "old")),
    ],
    ids=["no file", "the staging file", "a file inside the staging folder", "the target", "the target set aside"],
)
def test_a_failed_write_on_the_staging_path_or_the_target_names_only_the_target(tmp_path, filename):
    target = tmp_path / "model.safetensors"
    assert _failed_write(tmp_path, filename) == f"cannot write {target}: No space left on device{_COMMITTED_NOTHING}"


def test_a_run_into_a_target_an_open_transaction_stages_is_refused_with_one_exact_line(tmp_path):
    target = tmp_path / "model.safetensors"
    with sb.transaction(target):
        with pytest.raises(ConfigError) as caught:
            tx_module.refuse_if_busy(target)
    assert str(caught.value) == (
        f"another statebridge run (an open transaction of this process) is writing {target}; "
        "wait for it to finish or choose another target"
    )


def test_a_commit_whose_staged_version_is_gone_says_so_exactly(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(ExecutionError) as caught:
        with sb.transaction(target) as tx:
            tx.path.unlink()
    assert str(caught.value) == (
        f"cannot commit {target}: its staged version {tx.path.name} is gone (removed inside the "
        "transaction?); the target is as it was"
    )
    assert target.read_bytes() == b"previous"


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_exchange_swaps_two_paths_atomically(tmp_path, monkeypatch, kind, relative):
    """``renameat2(RENAME_EXCHANGE)``: both names stay, their contents trade places (relative to the current folder too)."""
    monkeypatch.chdir(tmp_path)
    a, b = Path("a"), Path("b")
    for path, text in ((a, "A"), (b, "B")):
        if kind == "folder":
            path.mkdir()
            (path / "x.txt").write_text(text)
        else:
            path.write_text(text)
    read = (lambda p: (p / "x.txt").read_text()) if kind == "folder" else Path.read_text
    if not relative:
        a, b = tmp_path / a, tmp_path / b
    assert tx_module._exchange(a, b) is True
    assert (read(a), read(b)) == ("B", "A")


def test_a_file_over_a_file_is_one_rename_even_where_folders_cannot_be_exchanged(tmp_path, monkeypatch):
    """Never the fallback for two plain files: the target is the old file or the new one, never neither."""
    monkeypatch.setattr(tx_module, "_exchange", lambda a, b: False)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    renamed: list[tuple[str, str]] = []
    real_rename = os.rename

    def rename(a, b):
        renamed.append((Path(a).name, Path(b).name))
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with sb.transaction(target, copy=False) as tx:
        tx.path.write_bytes(b"new")
    assert target.read_bytes() == b"new" and renamed == [] and _hidden(tmp_path) == []


def test_the_fallback_swap_sets_the_previous_target_aside_under_a_name_the_sweep_restores(tmp_path, monkeypatch):
    """The pause point ``swap`` stops between the two renames: the target is absent, its ``old`` sibling holds it."""
    monkeypatch.setattr(tx_module, "_exchange", lambda a, b: False)
    monkeypatch.setattr(tx_module, "_paused", set())
    monkeypatch.setenv(tx_module.PAUSE_ENV, "swap")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("old")
    seen: list[tuple[bool, list[str]]] = []

    class Stdin(io.StringIO):
        def readline(self, *args):
            seen.append((os.path.lexists(target), _hidden(tmp_path)))
            return "\n"

    monkeypatch.setattr(sys, "stdin", Stdin())
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with sb.transaction(target, copy=False) as tx:
        (tx.path / "a.txt").write_text("new")
    assert stderr.getvalue() == "statebridge: paused at swap\n"
    [(present, hidden)] = seen
    assert not present
    aside = [tx_module._LEFTOVER.match(name) for name in hidden if "~statebridge-old-" in name]
    assert len(aside) == 1 and aside[0]["tag"] == "old" and tx_module._target_name(aside[0]) == "ckpt"
    assert (target / "a.txt").read_text() == "new" and _hidden(tmp_path) == []


def test_a_pause_point_pauses_once_per_process(monkeypatch):
    monkeypatch.setattr(tx_module, "_paused", set())
    monkeypatch.setenv(tx_module.PAUSE_ENV, "commit")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n\n\n"))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    for _ in range(3):
        tx_module.pause_point("commit")
    tx_module.pause_point("swap")
    assert stderr.getvalue() == "statebridge: paused at commit\n"
    assert sys.stdin.read() == "\n\n"  # one line read, two left


def test_the_sweep_goes_on_after_restoring_a_lost_target(tmp_path):
    dead = _dead_pid()
    old = _as_dead(staging_path(tmp_path / "a", "old"), dead)  # sorts first: ".a~..."
    old.mkdir()
    (old / "x.txt").write_text("previous a")
    stale = _as_dead(staging_path(tmp_path / "b"), dead)
    stale.mkdir()
    assert sweep(tmp_path) == [stale]
    assert (tmp_path / "a" / "x.txt").read_text() == "previous a" and _hidden(tmp_path) == []


def test_the_sweep_goes_on_after_a_lost_target_it_cannot_restore(tmp_path, monkeypatch):
    dead = _dead_pid()
    old = _as_dead(staging_path(tmp_path / "a", "old"), dead)
    old.mkdir()
    stale = _as_dead(staging_path(tmp_path / "b"), dead)
    stale.mkdir()
    real_rename = os.rename

    def rename(a, b):
        if Path(a) == old:
            raise OSError(errno.EACCES, "Permission denied")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    assert sweep(tmp_path) == [stale]
    assert old.exists() and not (tmp_path / "a").exists()  # kept: it is the only copy of the previous target


def test_the_sweep_goes_on_past_a_leftover_it_cannot_remove(tmp_path, monkeypatch):
    """A leftover that ``rmtree`` fails on stays (and is not reported removed); the rest is swept, nothing raises."""
    dead = _dead_pid()
    stuck = _as_dead(staging_path(tmp_path / "a"), dead)
    stuck.mkdir()
    (stuck / "pinned.bin").write_bytes(b"x")
    stale = _as_dead(staging_path(tmp_path / "b"), dead)
    stale.mkdir()
    (stale / "loose.bin").write_bytes(b"y")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fsdecode(path) == "pinned.bin":
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    assert sweep(tmp_path) == [stale]
    assert (stuck / "pinned.bin").exists() and not stale.exists()


def test_a_leftover_of_a_process_of_another_user_is_kept(tmp_path, monkeypatch):
    """``kill(pid, 0)`` answers EPERM for a live process this user may not signal: it is alive."""
    other = _as_dead(staging_path(tmp_path / "a"), 1)
    other.mkdir()
    real_kill = os.kill

    def kill(pid, sig):
        if pid == 1 and sig == 0:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    assert sweep(tmp_path) == [] and other.exists()
