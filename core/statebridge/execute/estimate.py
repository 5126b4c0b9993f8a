"""Dry-run cost estimates: bytes, memory and time of a plan, known before any tensor byte is read.

Time comes from the read and write bandwidth of the target's filesystem,
measured once with a small scratch file there (never by reading the source's
data) and cached per device in ``~/.cache/statebridge/bandwidth.json`` (or
``$STATEBRIDGE_CACHE``) for a week.  The scratch file is named like a staging
sibling (:func:`~statebridge.execute.transaction.staging_path`), so one that a killed
probe leaves behind is removed by the next probe or run in that folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..tensors.meta import human_bytes
from .transaction import pause_point, staging_path, sweep
from ..writers.base import PlannedFile, Writer

if TYPE_CHECKING:
    from ..planning.plan import Plan

PROBE_BYTES = 64 * 1024 * 1024
CACHE_SECONDS = 7 * 24 * 3600
#: a dry run lists this many files, then counts the rest
SHOWN_FILES = 12


@dataclass(frozen=True)
class Bandwidth:
    """Sequential read and write speed of one filesystem, in bytes per second."""

    read: float
    write: float
    measured: bool = True  # False: a default, because the probe could not run


@dataclass(frozen=True)
class Estimate:
    """What a plan will cost."""

    bytes_read: int  # tensor bytes decoded into memory
    bytes_copied: int  # tensor bytes copied file to file without decoding
    bytes_written: int
    peak_tensor_bytes: int  # the largest group's tensors in memory at once
    seconds: float
    bandwidth: Bandwidth
    files: list[PlannedFile] = field(default_factory=list)  # what the writer will write, when it was known

    def render(self, verbose: bool = False) -> str:
        how = "measured" if self.bandwidth.measured else "assumed"
        lines = [
            f"  estimate: {human_bytes(self.bytes_read)} decoded, {human_bytes(self.bytes_copied)} copied as raw bytes, "
            f"{human_bytes(self.bytes_written)} written; tensors in memory at most {human_bytes(self.peak_tensor_bytes)}; "
            f"about {self.seconds:.1f} s (disk {human_bytes(self.bandwidth.read)}/s read, "
            f"{human_bytes(self.bandwidth.write)}/s write, {how})"
        ]
        if self.files:
            lines.append(f"  files ({len(self.files)}):")
            shown = self.files if verbose or len(self.files) <= SHOWN_FILES else self.files[: SHOWN_FILES - 1]
            width = max(len(planned.name) for planned in shown)
            for planned in shown:
                lines.append(f"    {planned.name:<{width}}  {human_bytes(planned.nbytes):>9}  {_holding(planned.keys)}".rstrip())
            if len(shown) < len(self.files):
                lines.append(f"    ... {len(self.files) - len(shown)} more (--verbose or --json lists them all)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, float]:
        return {
            "bytes_read": self.bytes_read,
            "bytes_copied": self.bytes_copied,
            "bytes_written": self.bytes_written,
            "peak_tensor_bytes": self.peak_tensor_bytes,
            "seconds": self.seconds,
            "read_bandwidth": self.bandwidth.read,
            "write_bandwidth": self.bandwidth.write,
            "files": [{"name": f.name, "bytes": f.nbytes, "keys": f.keys} for f in self.files],
        }


def _holding(keys: list[str]) -> str:
    if not keys:
        return ""
    if len(keys) == 1:
        return f"1 tensor: {keys[0]}"
    return f"{len(keys)} tensors: {keys[0]} .. {keys[-1]}"


def estimate(plan: "Plan", target: str | os.PathLike[str] | None = None, writer: Writer | None = None) -> Estimate:
    """Estimate ``plan``'s cost when written to ``target`` (bandwidth probed next to it).

    With the ``writer`` that will write it, the estimate also lists the files, from metadata alone.
    """
    metas = plan.source.metas()
    decoded = copied = peak = 0
    for group in plan.groups:
        if not group.outputs:
            continue
        spans = plan.raw_spans(group)
        size = sum(metas[k].nbytes for k in group.inputs)
        if len(spans) == len(group.outputs):
            copied += sum(span.length for key_spans in spans.values() for span in key_spans)
        else:
            decoded += size
            peak = max(peak, size + sum(m.nbytes for m in group.outputs.values()))
    bandwidth = probe(Path(target).parent if target else Path.cwd())
    written = plan.bytes_written
    seconds = (decoded + copied) / bandwidth.read + written / bandwidth.write
    files = writer.layout(plan.outputs) if writer is not None else []
    if writer is not None and plan.folder is not None and writer.writes_folder:
        files += plan.folder.planned_files()  # the model folder's companions, written beside the tensors
    return Estimate(decoded, copied, written, peak, seconds, bandwidth, files)


def probe(directory: Path) -> Bandwidth:
    """The bandwidth of ``directory``'s filesystem: cached, else measured with a scratch file.

    Scratch files that a killed probe (or run) left in ``directory`` are removed first.  A
    cache file that cannot be read or holds something else is measured over and rewritten.
    """
    directory = _existing(directory)
    sweep(directory)
    key = str(os.stat(directory).st_dev)
    cache = _cache_file()
    entries = _read_cache(cache)
    cached = entries.get(key)
    if cached and 0 <= time.time() - cached["when"] < CACHE_SECONDS:
        return Bandwidth(cached["read"], cached["write"])
    try:
        measured = _measure(directory)
    except OSError:
        return Bandwidth(200e6, 200e6, measured=False)
    entries[key] = {"read": measured.read, "write": measured.write, "when": time.time()}
    scratch = staging_path(cache)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        sweep(cache.parent)
        scratch.write_text(json.dumps(entries))
        os.replace(scratch, cache)  # whole or not at all: a probe killed here leaves no torn cache
    except OSError:
        scratch.unlink(missing_ok=True)
    return measured


def _read_cache(cache: Path) -> dict[str, dict[str, float]]:
    """The cache's well-formed entries (device -> read, write, when); anything else is ignored."""
    try:
        data = json.loads(cache.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        key: entry
        for key, entry in data.items()
        if isinstance(entry, dict)
        and all(
            isinstance(entry.get(name), (int, float)) and not isinstance(entry.get(name), bool) and entry[name] > 0
            for name in ("read", "write", "when")
        )
        and all(math.isfinite(entry[name]) for name in ("read", "write", "when"))
    }


def _measure(directory: Path) -> Bandwidth:
    scratch = staging_path(directory / "bandwidth-probe", "probe")
    block = os.urandom(1024 * 1024)
    try:
        start = time.perf_counter()
        with open(scratch, "wb") as f:
            for _ in range(PROBE_BYTES // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write = PROBE_BYTES / (time.perf_counter() - start)
        pause_point("probe")
        with open(scratch, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while f.read(len(block) * 8):
                pass
        read = PROBE_BYTES / (time.perf_counter() - start)
    finally:
        scratch.unlink(missing_ok=True)
    return Bandwidth(read, write)


def _existing(directory: Path) -> Path:
    directory = directory.absolute()
    while not directory.exists():
        directory = directory.parent
    return directory


def _cache_file() -> Path:
    root = Path(os.environ.get("STATEBRIDGE_CACHE", Path.home() / ".cache" / "statebridge"))
    return root / "bandwidth.json"


class PeakMemory:
    """How far this process's resident memory rose above where it stood when measuring began.

    Linux only: resets the kernel's high-water mark (``/proc/self/clear_refs``)
    and reads ``VmHWM`` afterwards; elsewhere :attr:`rise` stays ``None``.
    """

    def __init__(self) -> None:
        self.rise: int | None = None
        self._start: int | None = None

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = _status("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is not None:
            try:
                self.rise = max(0, _status("VmHWM") - self._start)
            except OSError:
                self.rise = None


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")
