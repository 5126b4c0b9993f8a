"""The Python entry points: plan a pipeline, run it to a file, or load it into a module."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import validate
from .coverage import Requirements, target_spec
from .distributed import rank_target, session
from .errors import ConfigError
from .estimate import PeakMemory, estimate
from .execute import ExecutionStats, execute, plan_signature
from .fingerprint import provenance
from .io import SourceLike, open_source
from .meta import human_bytes
from .patterns import describe_keys
from .plan import Plan
from .plugins import load_plugins
from .targets import TargetPolicy
from .transforms.base import Transform
from .transforms.composite import Pipeline
from .writers.base import Writer
from .writers.module import ModuleWriter

if TYPE_CHECKING:
    from torch import nn

PipelineLike = Transform | Sequence[Transform | Mapping[str, Any]] | None


def as_pipeline(pipeline: PipelineLike) -> Pipeline:
    """Accept a transform, a list of transforms or config-form steps, or None (identity)."""
    if pipeline is None:
        return Pipeline([])
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, Transform):
        return Pipeline([pipeline])
    return Pipeline(list(pipeline))


def plan(
    source: SourceLike,
    pipeline: PipelineLike = None,
    *,
    require: Requirements | Mapping[str, Any] | None = None,
    expect: Any = None,
    on_collision: str = "error",
    **options: Any,
) -> Plan:
    """Plan ``pipeline`` against ``source`` from headers alone, and run every validate hook.

    ``require`` (see :class:`~statebridge.coverage.Requirements`) and ``expect``
    (a target spec: module, key list or checkpoint) turn coverage and spec
    violations into errors here, before anything is read or written.
    ``on_collision="warn"`` lets the last writer of a key win, with a warning.
    """
    if on_collision not in ("error", "warn"):
        raise ConfigError(f"on_collision must be 'error' or 'warn', not {on_collision!r}")
    options.update(
        require=require if isinstance(require, Requirements) else Requirements.model_validate(dict(require or {})),
        expect=None if expect is None else target_spec(expect),
        on_collision=on_collision,
    )
    built = Plan.build(open_source(source), as_pipeline(pipeline), options)
    validate(built)
    return built


def writer_for(target: Path, format: str | None = None) -> type[Writer]:
    """The writer class for ``format``, or for the target's suffix when no format is named."""
    writers = load_plugins().writers
    if format is not None:
        try:
            return writers[format]
        except KeyError:
            raise ConfigError(f"no writer for format {format!r}; installed formats: {', '.join(sorted(writers))}") from None
    for cls in writers.values():
        if cls.for_target(target):
            return cls
    raise ConfigError(f"cannot tell the output format of {str(target)!r}; set format: one of {', '.join(sorted(writers))}")


def target_writer(
    plan: Plan,
    target: str | os.PathLike[str],
    *,
    format: str | None = None,
    shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Writer:
    """The writer that will write ``plan`` to ``target``, with the provenance it stores (fingerprint, lineage)."""
    target = Path(target)
    stored = {**provenance(plan.pipeline, plan.lineage), **(metadata or {})}
    writer = writer_for(target, format)(target, metadata=stored, shard_size=shard_size)
    writer.source_offsets = plan.raw_offsets()
    return writer


@dataclass
class RunReport:
    """What a run planned and did, with the dry-run estimate beside the actual figures."""

    plan: Plan
    target: Path
    files: list[Path]
    stats: ExecutionStats
    peak_memory: int | None = None  # how far resident memory rose during the run (Linux)
    replaced: str | None = None  # what was at the target before, when the run replaced something

    def render(self) -> str:
        s = self.stats
        lines = [
            f"wrote {self.target}: {s.tensors_written + s.tensors_copied_raw} tensors "
            f"({s.tensors_copied_raw} copied as raw bytes) in {len(self.files)} files"
        ]
        if self.replaced is not None:
            lines.append(f"  replaced what was there: {self.replaced}")
        guess = self.plan.estimate
        if guess is not None:
            memory = human_bytes(self.peak_memory) if self.peak_memory is not None else "unknown"
            lines.append(f"  {'':14}{'estimate':>12}{'actual':>12}")
            lines.append(f"  {'time':14}{guess.seconds:>11.2f}s{s.seconds:>11.2f}s")
            lines.append(f"  {'bytes written':14}{human_bytes(guess.bytes_written):>12}{human_bytes(s.bytes_written):>12}")
            lines.append(f"  {'memory rise':14}{human_bytes(guess.peak_tensor_bytes):>12}{memory:>12}")
        if s.budget:
            lines.append(
                f"  tensors in flight at most {human_bytes(s.peak_in_flight)} of a {human_bytes(s.budget)} budget"
                + (f" per process, {s.ranks} processes" if s.ranks > 1 else "")
            )
        for record in s.gate_records:
            lines.append(f"  gate {record.key}: chose {record.chosen}")
        return "\n".join(lines)


def run(
    source: SourceLike,
    pipeline: PipelineLike,
    target: str | os.PathLike[str],
    *,
    format: str | None = None,
    shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: bool | None = None,
    gates: Mapping[str, Any] | None = None,
    max_memory: int | None = None,
    workers: int = 1,
    require: Requirements | Mapping[str, Any] | None = None,
    expect: Any = None,
    on_collision: str = "error",
    distributed: bool | None = None,
    durable: bool = True,
    overwrite: bool = False,
) -> RunReport:
    """Stream ``source`` through ``pipeline`` into ``target``, atomically.

    The target (file or shard folder) appears only when everything was written
    and fsynced; on any error it is left as it was.  ``require``, ``expect``
    and ``on_collision`` are checked on the plan first, as in :func:`plan`.
    ``durable=False`` skips the fsyncs: the commit is still atomic for every
    process (an interrupted or failed run leaves nothing), but, as after a
    ``cp``, a power cut soon after may lose data the kernel had not written yet.

    Before anything is written the target policy (:mod:`statebridge.targets`) is
    checked: a target that contains or lies inside the source is refused, and an
    existing target that statebridge did not write (or the source itself) is
    replaced only with ``overwrite=True``.  A source file replaced or modified
    during the run fails it before the commit.

    Under ``torchrun`` the run is collective: every rank calls it with the same
    arguments and does a share of the work (see :mod:`statebridge.distributed`);
    ``distributed=False`` converts in this process alone, ``True`` also shares
    the work over a process group the caller initialised.
    """
    target = Path(target)
    with open_source(source) as src, session(distributed) as ranks:
        identity = src.identity()  # what is read from here on must be these files
        built = plan(
            src, pipeline, require=require, expect=expect, on_collision=on_collision,
            format=format, shard_size=shard_size, gates=dict(gates or {}),
        )
        writer = target_writer(built, target, format=format, shard_size=shard_size, metadata=metadata)
        writer.durable = durable
        policy = TargetPolicy(target, writer.writes_folder, src, named=source, overwrite=overwrite)
        agree = {
            "sources": identity.portable(),
            "steps": built.fingerprint,
            "output settings": (writer.format, shard_size, sorted(writer.metadata.items()), overwrite),
            "gate options": json.dumps(gates or {}, sort_keys=True, default=repr),
            "plans": plan_signature(built),
        }
        with rank_target(target, writer.writes_folder, ranks, durable, policy=policy, agree=agree) as staging:
            built.estimate = estimate(built, target, writer)
            if built.estimate.bytes_read or built.new:
                # Computing needs torch: import it before measuring, so the memory rise the report
                # shows is the run's tensors, not torch's own import (about 220 MB).
                import torch  # noqa: F401
            with PeakMemory() as memory:
                writer.path = staging
                try:
                    stats = execute(
                        built, writer, progress=progress, gates=gates, max_memory=max_memory, workers=workers, ranks=ranks
                    )
                    files = writer.finish()
                    identity.check()
                except BaseException:
                    writer.abort()
                    raise
    final = [target / f.relative_to(staging) if writer.writes_folder else target for f in files]
    verdict = policy.verdict
    return RunReport(built, target, final, stats, memory.rise, replaced=verdict.existing if verdict else None)


def load_into(
    model: nn.Module,
    source: SourceLike,
    pipeline: PipelineLike = None,
    *,
    strict: bool = True,
    progress: bool | None = None,
    max_memory: int | None = None,
    workers: int = 1,
) -> Plan:
    """Fill ``model``'s parameters and buffers from ``source`` through ``pipeline``, group by group.

    Works for meta-device models (tensors are assigned) and casts dtypes on the
    fly.  With ``strict``, every module key must be produced and no other key
    may be; shape mismatches are always errors, raised before any data is read.
    """
    with open_source(source) as src:
        built = plan(src, pipeline)
        execute(built, ModuleWriter(model, strict=strict), progress=progress, max_memory=max_memory, workers=workers)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        warnings.warn(
            f"{len(still_meta)} tensors of {type(model).__name__} are still on the meta device because the "
            f"state dict does not hold them (non-persistent buffers?): {describe_keys(still_meta)}; build the "
            "model with parameters on meta and buffers real (e.g. accelerate.init_empty_weights()) or re-create them",
            RuntimeWarning,
            stacklevel=2,
        )
    return built
