"""Distributed runs: the processes of a ``torchrun`` job share one conversion.

``torchrun --nproc-per-node N -m statebridge run CONFIG`` (or a script under
torchrun in which every rank calls :func:`statebridge.run`) makes the run
collective.  Every rank plans the same pipeline from headers and checks the
target policy; the ranks compare their targets, source files, steps (with their
parameters), writer settings and plans, and refuse to start if any differ;
rank 0 stages the target and lays its files out at their final size; each rank executes a
contiguous share of the groups, balanced by estimated work, and writes its
tensors at their offsets in those files; once every rank has fsynced its part,
rank 0 writes the shard index and commits.  Each source tensor is read by the
one rank that needs it and no tensor travels between ranks: they exchange only
small objects (the staging path, a status at each step, statistics) over a
gloo group, on CPU and GPU machines alike.  The output is byte-identical to a
single-process run, because the layout comes from the plan, not from who wrote
what.  Source and target must be on a file system every rank sees.

Failures: every exchange is the same collective (``all_gather_object`` of a
status), so a rank that fails anywhere reports its error at the next exchange,
whichever exchange its peers are waiting in; they all raise, naming the rank
and its error, and rank 0 removes the staging folder.  A rank that dies
outright breaks its peers' connections, which is reported the same way, and
SIGTERM from torchrun stopping the job unwinds rank 0 through the same cleanup
(:func:`~statebridge.execute.transaction.atomic_target` turns it into an exception).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ExecutionError
from .transaction import atomic_target

if TYPE_CHECKING:
    from .targets import TargetPolicy

#: how long a rank waits for the others at one exchange; it includes waiting for
#: the slowest rank to finish its share, so it is long (a rank that dies is noticed at once)
TIMEOUT = timedelta(hours=24)


@dataclass
class _Status:
    """What one rank brings to an exchange."""

    payload: Any = None
    error: str | None = None


@dataclass
class Ranks:
    """This process's place in a distributed run, and the exchanges between ranks."""

    rank: int
    world: int
    local_world: int  # ranks on this machine, which share its memory
    group: Any = None  # the gloo process group (None: the default group)
    failed: bool = field(default=False, init=False)

    def sync(self, payload: Any = None) -> list[Any]:
        """Wait for every rank; return each rank's ``payload``, in rank order.

        Raises :class:`~statebridge.errors.ExecutionError` naming the rank and its
        error if any rank reported a failure instead.
        """
        statuses = self._exchange(_Status(payload))
        errors = [(r, s.error) for r, s in enumerate(statuses) if s.error is not None]
        if errors:
            self.failed = True
            raise ExecutionError("; ".join(f"rank {r} of {self.world} failed: {error}" for r, error in errors))
        return [s.payload for s in statuses]

    @contextmanager
    def guard(self) -> Iterator[None]:
        """If the block fails on this rank, report it at the exchange the other ranks wait in."""
        try:
            yield
        except BaseException as e:
            if not self.failed:
                self.failed = True
                try:
                    self._exchange(_Status(error=f"{type(e).__name__}: {e}"))
                except ExecutionError:
                    pass  # the peers are gone too; this rank's own error is the one to raise
            raise

    def require_same(self, values: list[Any], what: str) -> None:
        """Raise on every rank (which all see the same ``values``) unless the ranks agree."""
        differing = [rank for rank, value in enumerate(values) if value != values[0]]
        if differing:
            self.failed = True  # every rank raises the same error here: nothing left to report
            raise ConfigError(
                f"the ranks of this distributed run have different {what} (rank {differing[0]} differs from rank 0); "
                "every rank must run the same conversion (or pass distributed=False to convert in one process)"
            )

    def share(self, work: Sequence[float]) -> range:
        """This rank's contiguous share of items with these estimated ``work`` figures."""
        return split(work, self.world)[self.rank]

    def _exchange(self, status: _Status) -> list[_Status]:
        import torch.distributed as dist

        statuses: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(statuses, status, group=self.group)
        except (RuntimeError, ValueError) as e:  # DistBackendError and friends: a peer died or timed out
            self.failed = True
            raise ExecutionError(f"rank {self.rank} of {self.world} lost contact with the other ranks: {e}") from None
        return statuses


def split(work: Sequence[float], parts: int) -> list[range]:
    """Cut items into ``parts`` contiguous ranges of nearly equal total work.

    Contiguous, so each rank reads its stretch of every source file front to
    back and writes a stretch of the target; each cut is placed at the item
    boundary nearest an equal share, so no range is off by more than one item.
    """
    total = float(sum(work))
    cuts = [0]
    done, index = 0.0, 0
    for part in range(1, parts):
        goal = total * part / parts
        while index < len(work) and done + work[index] <= goal:
            done += work[index]
            index += 1
        if index < len(work) and goal - done > done + work[index] - goal:
            done += work[index]
            index += 1
        cuts.append(max(index, cuts[-1]))
    cuts.append(len(work))
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


#: whether statebridge initialised torch.distributed (from torchrun's environment) in this process
_OWN_GROUP = False


@contextmanager
def session(distributed: bool | None = None) -> Iterator[Ranks | None]:
    """The ranks of this run, or None when it runs in this process alone.

    ``distributed=None`` (auto): collective when torchrun started this process
    (``WORLD_SIZE`` > 1) and torch.distributed is not initialised, or was
    initialised by statebridge.  ``True``: collective over whatever process
    group is initialised, or torchrun's environment.  ``False``: this process
    alone.  A script with its own process group (a training job) that converts
    on one rank is therefore left alone unless it asks.

    The group statebridge initialises stays up until the process exits, so a
    script can run several conversions (torch.distributed cannot be
    initialised twice in one process reliably).
    """
    global _OWN_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    loaded = sys.modules.get("torch.distributed")  # no group can exist before torch.distributed is imported
    initialised = loaded is not None and loaded.is_available() and loaded.is_initialized()
    if distributed is False or (distributed is None and initialised and not _OWN_GROUP) or (world <= 1 and not initialised):
        yield None
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("a distributed run needs torch.distributed, which this torch build lacks")
    if not initialised:
        dist.init_process_group("gloo", timeout=TIMEOUT)
        _OWN_GROUP = True
        atexit.register(_shut_down)
    if dist.get_world_size() == 1:
        yield None
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size())))
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local_world, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _shut_down() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank_target(
    target: Path,
    folder: bool,
    ranks: Ranks | None,
    durable: bool = True,
    *,
    policy: TargetPolicy | None = None,
    agree: Mapping[str, Any] | None = None,
) -> Iterator[Path]:
    """:func:`~statebridge.execute.transaction.atomic_target` for one process, or for every rank of a run at once.

    In a distributed run every rank first checks the target ``policy`` and the ranks compare
    what each is about to do (``agree``: the target, the pipeline's fingerprint, the writer's
    settings, the source files' identity, the plan, each under the name an error would give
    it), so ranks that would write different things into one target are refused before
    anything is written.  All ranks then get rank 0's staging path; rank 0 commits only after
    every rank has finished (written and fsynced) its part, and every rank returns only after
    the commit, so the target is complete wherever ``run()`` returns.
    """
    if ranks is None:
        with atomic_target(target, folder=folder, durable=durable, policy=policy) as staging:
            yield staging
        return
    with ranks.guard():
        if policy is not None:
            policy.check()
        offers = ranks.sync({"targets": str(target.absolute()), **(agree or {})})
        for what in offers[0]:
            ranks.require_same([offer.get(what) for offer in offers], what)
        if ranks.rank == 0:
            with atomic_target(target, folder=folder, durable=durable, policy=policy) as staging:
                ranks.sync(str(staging))
                yield staging
                ranks.sync()  # every rank has written and fsynced its part
            ranks.sync()  # committed
        else:
            yield Path(ranks.sync()[0])
            ranks.sync()
            ranks.sync()
