"""The streaming executor: runs a plan group by group into a writer.

Only the current group's tensors are alive at any time: source tensors are
memory-mapped views read on demand, outputs are handed to the writer and
released before the next group starts.  Tensors a group merely renames are
copied as raw bytes when the writer supports it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .errors import ExecutionError
from .gates import GateRecord, run_gates
from .meta import TensorMeta
from .plan import Plan
from .writers.base import Writer


@dataclass
class ExecutionStats:
    """What an execution did, for the run report."""

    seconds: float = 0.0
    tensors_written: int = 0
    tensors_copied_raw: int = 0
    bytes_written: int = 0
    gate_records: list[GateRecord] = field(default_factory=list)


def execute(
    plan: Plan,
    sink: Writer,
    *,
    progress: bool | None = None,
    gates: Mapping[str, Any] | None = None,
    max_memory: int | None = None,
    workers: int = 1,
) -> ExecutionStats:
    """Stream ``plan`` into ``sink`` (which must not have begun yet); return what was done.

    ``max_memory`` and ``workers`` are accepted for the scale work (issue: memory budget,
    threads); groups currently run one at a time.
    """
    source = plan.source
    stats = ExecutionStats()
    started = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    gate_options = dict(gates or {})
    sink.begin(plan.outputs)
    with tqdm(total=plan.bytes_written, unit="B", unit_scale=True, unit_divisor=1024, desc="statebridge", disable=not show) as bar:
        for group in plan.groups:
            if not group.outputs:
                continue
            pending = dict(group.outputs)
            if group.renames:
                for key, origin in group.renames.items():
                    span = source.raw_span(origin)
                    if span is not None and sink.write_raw(key, span):
                        stats.tensors_copied_raw += 1
                        stats.bytes_written += span.length
                        bar.update(span.length)
                        del pending[key]
            if not pending:
                continue
            inputs = {key: source.load(key) for key in group.inputs}
            outputs = group.compute(inputs)
            for key, meta in pending.items():
                if key not in outputs:
                    raise ExecutionError(f"group {list(group.inputs)} planned to produce {key!r} but did not")
                tensor, record = run_gates(key, outputs[key], inputs, group, gate_options)
                if record is not None:
                    stats.gate_records.append(record)
                _check(key, tensor, meta)
                sink.write(key, tensor)
                stats.tensors_written += 1
                stats.bytes_written += meta.nbytes
                bar.update(meta.nbytes)
            del inputs, outputs
    stats.seconds = time.perf_counter() - started
    return stats


def _check(key: str, tensor: Any, meta: TensorMeta) -> None:
    if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
        raise ExecutionError(f"{key!r} was computed as {TensorMeta.of(tensor)} but the plan says {meta}")
