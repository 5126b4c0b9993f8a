"""Helpers for tests that interrupt runs at a point they control (``STATEBRIDGE_PAUSE_AT``), never by timing.

A process started with :func:`start` stops at the named pause point (see
:func:`statebridge.execute.transaction.pause_point`) and :func:`start` returns only once it
has said so; the test then kills it, signals it or changes its files, and
:func:`resume` lets it go on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import statebridge
from statebridge.execute.transaction import PAUSE_ENV

CORE = str(Path(statebridge.__file__).resolve().parents[1])  # the code this test process imported


def environment(cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a statebridge subprocess: this checkout's code, its own bandwidth cache."""
    env = {**os.environ, "STATEBRIDGE_CACHE": str(cache), "PYTHONPATH": CORE, **(extra or {})}
    env.pop(PAUSE_ENV, None)
    return env


@dataclass
class Paused:
    """A process stopped at a pause point."""

    process: subprocess.Popen[str]
    stderr: str  # what it wrote to stderr until it paused

    def resume(self) -> subprocess.CompletedProcess[str]:
        """Let it go on and wait for it."""
        out, err = self.process.communicate("\n")
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out, self.stderr + err)

    def kill(self) -> None:
        self.process.kill()
        self.process.communicate()


def start(args: Sequence[str], point: str, *, cache: Path, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Paused:
    """Run ``python ARGS`` until it pauses at ``point``; fail (with its output) if it ends first."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env={**environment(cache, env), PAUSE_ENV: point},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.strip() == f"statebridge: paused at {point}":
            return Paused(process, "".join(seen))
    out, err = process.communicate()
    raise AssertionError(f"the process ended (status {process.returncode}) before pausing at {point}:\n{''.join(seen)}{err}\n{out}")


def cli(*args: str) -> list[str]:
    """The argument list that runs the statebridge command line."""
    return ["-m", "statebridge", *args]


def hidden(folder: Path) -> list[str]:
    """Names in ``folder`` that statebridge stages or leaves behind."""
    return sorted(p.name for p in folder.iterdir() if "~statebridge-" in p.name)
