"""Shared pieces of the benchmarks: the checkpoints, measuring a fresh process, and the tables.

Every case runs in a fresh process, after the page cache has written back
what earlier cases left dirty (``sync``), so no case pays for another's
writes.  Source checkpoints stay in the page cache (they are read before the
first case), as they would after a download; each case's output is deleted
after it.  A case reports:

- ``wall``: the whole process, interpreter start and imports included, from
  outside (what a user waits for on the command line);
- ``work``: the timed part inside the process, imports excluded (for Python cases);
- ``peak``: the process's peak resident memory (``ru_maxrss`` from ``wait4``);
- ``rise``: for Python cases, how far resident memory rose during ``work``
  above where it stood after the imports (the kernel's high-water mark is reset
  first through ``/proc/self/clear_refs``).

Each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig

CACHE = Path(os.environ.get("STATEBRIDGE_BENCH_DIR", Path.home() / ".cache" / "statebridge" / "bench"))
MB = 1024**2

#: a llama-style model of 2.46 GB in float16: hidden 2048, 25 layers, grouped-query attention (TinyLlama-like)
LLAMA_2_5G = dict(layers=25, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
#: 9.7 GB in float16 (Llama-2-7B's widths, 26 layers): more than the kernel's dirty page cache allowance
LLAMA_10G = dict(layers=26, hidden=4096, intermediate=11008, heads=32, kv_heads=8, vocab=32000)


def llama_checkpoint(name: str, sizes: dict[str, int]) -> Path:
    """A folder with ``model.safetensors`` (written once, then reused) and a matching ``config.json``."""
    import torch
    from statebridge.testing import LlamaShape, write_llama

    folder = CACHE / name
    shape = LlamaShape(**sizes)
    weights = folder / "model.safetensors"
    if not weights.exists() or weights.stat().st_size < shape.nbytes_fp16:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"writing {weights} ({shape.nbytes_fp16 / 1e9:.2f} GB, once)...", flush=True)
        write_llama(weights, shape, dtype=torch.float16)
    llama_config(sizes).save_pretrained(folder)
    _read_through(weights)
    return folder


def llama_config(sizes: dict[str, int]) -> LlamaConfig:
    """The transformers config of a :class:`~statebridge.testing.LlamaShape`, so ``from_pretrained`` can read the folder."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
        num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"],
        tie_word_embeddings=False, dtype="float16",
    )


def _read_through(path: Path) -> None:
    """Read a file once so it is in the page cache, as the sources of every case are."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MB):
            pass


@dataclass
class Result:
    name: str
    wall: list[float] = field(default_factory=list)
    work: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    rise: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def median(self, what: str) -> float | None:
        values = getattr(self, what)
        return statistics.median(values) if values else None

    def value(self, metric: str) -> float | None:
        """``time`` is the in-process time where there is one, else the whole process's."""
        if metric == "time":
            return self.median("work") if self.work else self.median("wall")
        return self.median(metric)


def settle() -> None:
    """Write back dirty pages from earlier cases, so each case pays for its own writes only."""
    os.sync()
    time.sleep(1.0)


def measure(command: Sequence[str]) -> tuple[float, int | None, str]:
    """Run a command; return its wall time, peak RSS in bytes and its output (stdout and stderr).

    Peak RSS comes from GNU time (``/usr/bin/time -f %M``): a child forked from
    this (large) process would otherwise count this process's pages as its own.
    """
    settle()
    timer = ["/usr/bin/time", "-f", "@@maxrss %M"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    done = subprocess.run(timer + list(command), capture_output=True, text=True)
    wall = time.perf_counter() - started
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{text[-3000:]}")
    peak = next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("@@maxrss")), None)
    return wall, peak, text


HARNESS = """
import json, os, time
def _status(field):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))
{setup}
extra = {{}}
open('/proc/self/clear_refs', 'w').write('5')
_base = _status('VmRSS')
_started = time.perf_counter()
{work}
_work = time.perf_counter() - _started
print('@@' + json.dumps({{'work': _work, 'rise': _status('VmHWM') - _base, 'extra': extra}}))
"""


def python_case(setup: str, work: str) -> list[str]:
    """A command running ``setup`` (imports, opening), then timing ``work``, in a fresh interpreter."""
    code = HARNESS.format(setup=textwrap.dedent(setup).strip(), work=textwrap.dedent(work).strip())
    return [sys.executable, "-c", code]


def compare(cases: Sequence[tuple[str, Sequence[str]]], times: int, cleanup: Callable[[], None]) -> list[Result]:
    """Measure every case ``times`` times, round robin (so drift on a shared machine spreads
    over all cases), after one discarded run of the first case; ``cleanup`` runs after each."""
    results = [Result(label) for label, _ in cases]
    _once(cases[0][1], cleanup)
    for round_ in range(times):
        for result, (label, command) in zip(results, cases):
            print(f"  [{round_ + 1}/{times}] {label}", flush=True)
            wall, peak, text = _once(command, cleanup)
            result.wall.append(wall)
            if peak is not None:
                result.peak.append(peak)
            for line in text.splitlines():
                if line.startswith("@@{"):
                    inner = json.loads(line[2:])
                    result.work.append(inner["work"])
                    if inner.get("rise") is not None:
                        result.rise.append(inner["rise"])
                    result.extra.update(inner.get("extra", {}))
    return results


def _once(command: Sequence[str], cleanup: Callable[[], None]) -> tuple[float, int | None, str]:
    try:
        return measure(command)
    finally:
        cleanup()


def remove(*paths: Path) -> Callable[[], None]:
    """A cleanup that deletes ``paths`` (files or folders)."""

    def cleanup() -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    return cleanup


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per case; medians are reported (default 3)")
    return p


def machine() -> str:
    """The machine and software the figures come from, and today's date."""
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    import torch

    return (
        f"{platform.machine()}, {cores} cores, {total / 1024**3:.0f} GB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def table(title: str, rows: list[Result], ratios: dict[str, tuple[str, str]]) -> str:
    """A markdown table of medians, plus ratio columns ``label: (metric, baseline case)``.

    Metrics: ``time`` (in-process work time; the wall time for plain commands
    such as ``cp``), ``wall`` (whole process), ``peak`` (peak RSS), ``rise``.
    The range column is the spread of ``time`` over the runs.
    """
    by_name = {r.name: r for r in rows}
    head = ["case", "wall s", "in-process s", "range s", "peak RSS MB", "rise MB", *ratios]
    lines = [f"\n{title}\n", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    for r in rows:
        times = r.work or r.wall
        cells = [r.name, _fmt(r.value("wall"), "{:.2f}"), _fmt(r.median("work"), "{:.2f}"), f"{min(times):.2f}–{max(times):.2f}",
                 _fmt(r.value("peak"), "{:.0f}", MB), _fmt(r.value("rise"), "{:.0f}", MB)]
        for metric, base in ratios.values():
            mine, reference = r.value(metric), by_name[base].value(metric)
            cells.append(_fmt(mine / reference if mine is not None and reference else None, "{:.2f}x"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, unit: float = 1) -> str:
    return "" if value is None else spec.format(value / unit)
