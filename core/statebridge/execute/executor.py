"""The streaming executor: runs a plan group by group into a writer, within a memory budget.

**Order.** Groups run in plan order, which is the source's storage order (each
group sits where its first input is stored), so every source file is read
front to back and every target file is written front to back.

**Raw copies.** Tensors whose bytes are byte ranges of source tensors (a
rename, a move to another shard, a concatenation or split along the first
dimension, a reshape: ``Group.pieces``) are copied as raw bytes from the
source file when the source stores plain bytes and the writer can place them;
they are never decoded and cost no memory.

**Memory.** A computed group costs the bytes of its inputs and outputs while
it is in flight: loaded, computed, and not yet written.  At most ``max_memory``
bytes are in flight at once; a group larger than the budget waits until
nothing else is in flight, runs alone, and is reported with a warning.  Each
group's tensors are released once written, and source tensors are private
memory maps that are unmapped when released, so resident memory follows what
is in flight.  The default budget is half the memory available when the run
starts, shared by the ranks on this machine.

**Threads.** With ``workers > 1`` a thread pool loads and computes upcoming
groups while the calling thread writes finished ones in plan order; torch's
intra-op threads are divided among the workers so they do not oversubscribe
the cores.  Writers and gates are only ever called from the calling thread.

**Ranks.** In a distributed run (:mod:`statebridge.execute.distributed`) rank 0 lays
the target out, the other ranks join it, and each rank executes a contiguous
share of the groups, balanced by estimated work; the statistics are gathered
so every rank reports the whole run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from .distributed import Ranks
from ..errors import ConfigError, ExecutionError
from ..trust.gates import GateRecord, Gates
from ..tensors.meta import TensorMeta, human_bytes
from ..tensors.patterns import describe_keys
from ..planning.plan import Plan
from .transaction import pause_point
from ..transforms.base import Group, Tensors
from ..writers.base import Writer

if TYPE_CHECKING:
    pass

#: work of a byte copied raw, relative to a byte a computed group reads or writes: on the benchmark
#: machine kernel copies ran at 2.4 GB/s and a cast (which reads and writes each byte) at 0.4 GB/s
RAW_COPY_WORK = 1 / 3
#: a floor for the default budget, so a machine short of free memory still makes progress
MIN_DEFAULT_BUDGET = 256 * 1024**2


@dataclass
class ExecutionStats:
    """What an execution did, for the run report."""

    seconds: float = 0.0
    tensors_written: int = 0
    tensors_copied_raw: int = 0
    bytes_written: int = 0
    gate_records: list[GateRecord] = field(default_factory=list)
    budget: int = 0  # the memory budget for tensors in flight (per rank)
    peak_in_flight: int = 0  # the most bytes of tensors in flight at once (on any rank)
    ranks: int = 1  # processes that shared the run

    @classmethod
    def combine(cls, parts: list["ExecutionStats"]) -> "ExecutionStats":
        """The statistics of a whole distributed run from each rank's, in rank order."""
        return cls(
            seconds=max(p.seconds for p in parts),
            tensors_written=sum(p.tensors_written for p in parts),
            tensors_copied_raw=sum(p.tensors_copied_raw for p in parts),
            bytes_written=sum(p.bytes_written for p in parts),
            gate_records=[r for p in parts for r in p.gate_records],
            budget=min(p.budget for p in parts),
            peak_in_flight=max(p.peak_in_flight for p in parts),
            ranks=len(parts),
        )


def execute(
    plan: Plan,
    sink: Writer,
    *,
    progress: bool | None = None,
    gates: Gates | None = None,
    max_memory: int | None = None,
    workers: int = 1,
    ranks: Ranks | None = None,
) -> ExecutionStats:
    """Stream ``plan`` into ``sink`` (which must not have begun yet); return what was done.

    ``max_memory`` bounds the bytes of tensors in flight (default: half the
    available memory, shared by this machine's ranks); ``workers`` threads load
    and compute groups.  With ``ranks`` (inside :func:`statebridge.execute.distributed.rank_target`)
    this process executes its share of a distributed run.
    """
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    if max_memory is not None and max_memory <= 0:
        raise ConfigError(f"max_memory must be positive, not {max_memory}")
    started = time.perf_counter()
    budget = max_memory or default_budget(ranks.local_world if ranks else 1)
    groups = [g for g in plan.groups if g.outputs]
    if ranks is None:
        sink.begin(plan.outputs)
    else:
        groups = _open_shared(plan, sink, ranks, groups)
    stats = ExecutionStats(budget=budget)
    show = (sys.stderr.isatty() if progress is None else progress) and (ranks is None or ranks.rank == 0)
    total = sum(m.nbytes for g in groups for m in g.outputs.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="statebridge", disable=not show) as bar:
        _Run(plan, sink, stats, gates or Gates(), bar).run(groups, budget, workers)
    stats.seconds = time.perf_counter() - started
    if ranks is not None:
        stats = ExecutionStats.combine(ranks.sync(stats))
    return stats


def default_budget(local_ranks: int = 1) -> int:
    """Half the memory available now, shared by the ``local_ranks`` processes of this machine."""
    return max(available_memory() // 2 // max(local_ranks, 1), MIN_DEFAULT_BUDGET)


def available_memory() -> int:
    """Memory the system can give without swapping (``MemAvailable``), or a guess from the total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def memory_cost(plan: Plan, group: Group, computed: Mapping[str, TensorMeta]) -> int:
    """Bytes a group holds in flight when it computes ``computed``: its inputs and those outputs."""
    if not computed:
        return 0
    metas = plan.source.metas()
    return sum(metas[k].nbytes for k in group.inputs) + sum(m.nbytes for m in computed.values())


def work(plan: Plan, group: Group) -> float:
    """Estimated work of a group, in byte-equivalents, to balance ranks.

    A raw copy moves bytes in the kernel; a computed group reads, computes and
    writes, with as many passes over its tensors as its ``effort`` says (one per
    operation in its chain unless a transform declared more).
    """
    raw = plan.raw_spans(group)
    if len(raw) == len(group.outputs):
        return RAW_COPY_WORK * sum(span.length for spans in raw.values() for span in spans)
    return memory_cost(plan, group, group.outputs) * group.passes


def _open_shared(plan: Plan, sink: Writer, ranks: Ranks, groups: list[Group]) -> list[Group]:
    """Rank 0 lays the target out, the others join it; return this rank's share of the groups."""
    if not sink.shareable:
        raise ConfigError(
            f"the {sink.format} writer cannot be written by several processes; run this conversion in one process "
            "(without torchrun), or write safetensors"
        )
    if ranks.rank == 0:
        sink.begin(plan.outputs)
    ranks.sync()  # the files now exist at their final size, headers in place
    if ranks.rank != 0:
        sink.join(plan.outputs)
    return [groups[i] for i in ranks.share([work(plan, g) for g in groups])]


def plan_signature(plan: Plan) -> str:
    """A digest of what a plan writes, and in how many groups: the ranks of a run compare it before writing."""
    groups = sum(1 for g in plan.groups if g.outputs)
    text = repr([(key, str(meta)) for key, meta in plan.outputs.items()] + [groups])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Flight:
    """A computed group between loading and writing."""

    group: Group
    computed: dict[str, TensorMeta]
    cost: int
    result: Future[tuple[Tensors, Tensors]]


class _Run:
    """One execution: raw copies and writes on the calling thread, loading and computing on workers."""

    def __init__(self, plan: Plan, sink: Writer, stats: ExecutionStats, gates: Gates, bar: tqdm) -> None:
        self.plan, self.sink, self.stats, self.gates, self.bar = plan, sink, stats, gates, bar

    def run(self, groups: list[Group], budget: int, workers: int) -> None:
        if workers == 1:
            for group in groups:
                computed = self._copy_raw(group)
                if computed:
                    self._admit(group, computed, memory_cost(self.plan, group, computed), budget, 0)
                    self._write(group, computed, *self._compute(group))
                pause_point("writing")
            return
        # Divide torch's intra-op threads among the workers.  A run that computes has imported
        # torch by now (api.run does, before measuring); one that only copies raw bytes has not,
        # and does not need it.
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else 0
        if torch is not None:
            torch.set_num_threads(max(1, threads // workers))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="statebridge")
        window: deque[_Flight] = deque()  # in plan order
        in_flight = 0
        try:
            for group in groups:
                computed = self._copy_raw(group)
                if not computed:
                    pause_point("writing")
                    continue
                cost = memory_cost(self.plan, group, computed)
                while window and (in_flight + cost > budget or len(window) >= workers):
                    in_flight -= self._land(window.popleft())
                self._admit(group, computed, cost, budget, in_flight)
                window.append(_Flight(group, computed, cost, pool.submit(self._compute, group)))
                in_flight += cost
            while window:
                in_flight -= self._land(window.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if torch is not None:
                torch.set_num_threads(threads)

    def _admit(self, group: Group, computed: dict[str, TensorMeta], cost: int, budget: int, in_flight: int) -> None:
        """Record a group entering flight; warn when it alone exceeds the budget (it then runs alone)."""
        if cost > budget:
            warnings.warn(
                f"group [{describe_keys(list(group.inputs))}] -> [{describe_keys(list(computed))}] needs "
                f"{human_bytes(cost)} in memory, more than the budget of {human_bytes(budget)}; running it alone "
                "(raise --max-memory / max_memory to silence this)",
                RuntimeWarning,
                stacklevel=5,
            )
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, in_flight + cost)

    def _copy_raw(self, group: Group) -> dict[str, TensorMeta]:
        """Copy what can be copied as raw bytes; return the outputs left to compute."""
        computed = dict(group.outputs)
        for key, spans in self.plan.raw_spans(group).items():
            if self.sink.write_raw(key, spans):
                self.stats.tensors_copied_raw += 1
                # a quantized tensor's blocks are fewer bytes than its values
                self.stats.bytes_written += sum(span.length for span in spans)
                self.bar.update(group.outputs[key].nbytes)
                del computed[key]
        return computed

    def _compute(self, group: Group) -> tuple[Tensors, Tensors]:
        inputs = {key: self.plan.source.load(key) for key in group.inputs}
        return inputs, group.compute(inputs)

    def _land(self, flight: _Flight) -> int:
        self._write(flight.group, flight.computed, *flight.result.result())
        pause_point("writing")
        return flight.cost

    def _write(self, group: Group, computed: dict[str, TensorMeta], inputs: Tensors, outputs: Tensors) -> None:
        for key, meta in computed.items():
            if key not in outputs:
                raise ExecutionError(f"group [{describe_keys(list(group.inputs))}] planned to produce {key!r} but did not")
            tensor, record = self.gates.choose(key, outputs[key], inputs, group)
            if record is not None:
                self.stats.gate_records.append(record)
            _check(key, tensor, meta)
            self.sink.write(key, tensor)
            self.stats.tensors_written += 1
            self.stats.bytes_written += meta.stored_nbytes if meta.encode else meta.nbytes  # quantize: its blocks
            self.bar.update(meta.nbytes)


def _check(key: str, tensor: Any, meta: TensorMeta) -> None:
    if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
        raise ExecutionError(f"{key!r} was computed as {TensorMeta.of(tensor)} but the plan says {meta}")

