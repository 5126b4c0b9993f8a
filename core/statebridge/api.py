"""The Python entry points: plan a pipeline, run it to a file, load it into a module, analyse states.

These functions, with :mod:`statebridge.config` and :mod:`statebridge.cli`,
are the only callers of the plugin hooks: they take the installed plugins
(:func:`statebridge.plugins.installed`) and hand lower layers what they need
(the transform catalog, the validate hook caller, the gates, the writer).
Their options are :class:`statebridge.options.RunOptions`, shared with config
files and the command line.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .execute.distributed import rank_target, session
from .execute.estimate import PeakMemory, estimate
from .execute.executor import ExecutionStats, execute, plan_signature
from .execute.targets import TargetPolicy
from .options import PlanOptions, RunOptions, validated
from .planning.fingerprint import provenance
from .planning.folder import read_folder, source_folder
from .planning.plan import Plan, paused_gc
from .plugins import Plugins, installed
from .readers import SourceLike, open_source
from .tensors.meta import human_bytes
from .tensors.patterns import describe_keys
from .tensors.provenance import COMPANIONS_KEY
from .transforms.base import Transform
from .transforms.composite import Pipeline, build_steps
from .trust.companions import fit_target
from .trust.quantized import fit_types
from .trust.coverage import target_spec
from .trust.findings import validate
from .trust.gates import Gates
from .writers.base import Writer
from .writers.metadata import edit_metadata
from .writers.module import ModuleWriter

if TYPE_CHECKING:
    import os

    from torch import nn

PipelineLike = Transform | Sequence[Transform | Mapping[str, Any]] | None


def as_pipeline(pipeline: PipelineLike, plugins: Plugins | None = None) -> Pipeline:
    """One pipeline from a transform, a list of transforms or config-form steps (``{name: params}``), or None.

    Config-form steps, nested ones included, are built with the installed
    transforms; this is how Python code composes plugin steps by name.
    """
    if pipeline is None:
        return Pipeline([])
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, Transform):
        return Pipeline([pipeline])
    steps = list(pipeline)
    if any(not isinstance(step, Transform) for step in steps):
        steps = build_steps(steps, (plugins or installed()).transforms)
    return Pipeline(steps)


def plan(source: SourceLike | Plan, pipeline: PipelineLike = None, **options: Any) -> Plan:
    """Plan ``pipeline`` against ``source`` from headers alone, and run every validate hook once.

    ``options`` are :class:`~statebridge.options.PlanOptions`: ``require`` (see
    :class:`~statebridge.trust.coverage.Requirements`) and ``expect`` (a target
    spec: module, key list or checkpoint) turn coverage and spec violations into
    errors here, before anything is read or written; ``on_collision="warn"``
    lets the last writer of a key win, with a warning; ``gates`` must name
    installed gates.  A :class:`Plan` passed as ``source`` is returned as it is.
    """
    if isinstance(source, Plan):
        return source
    checked: PlanOptions = validated(PlanOptions, options)
    plugins = installed()
    Gates(plugins.gates, checked.gates)  # an unknown gate name is an error now, not a silent no-op later
    settings = checked.model_dump()
    settings.update(require=checked.require, expect=None if checked.expect is None else target_spec(checked.expect))
    with paused_gc():
        opened = open_source(source)
        built = Plan.build(opened, as_pipeline(pipeline, plugins), settings, plugins.providers())
        folder = source_folder(source, opened)
        built.folder = read_folder(folder, built.pipeline, opened) if folder is not None else None
        validate(built, plugins.hook.validate_plan, plugins.hook.suggest_keys)
    return built


def writer_for(target: Path, format: str | None = None) -> type[Writer]:
    """The writer class for ``format``, or for the target's suffix when no format is named."""
    writers = installed().writers
    if format is not None:
        if format not in writers:
            raise ConfigError(f"no writer for format {format!r}; installed formats: {', '.join(writers.names())}")
        return writers.get(format)
    for _, cls in writers.items():
        if cls.for_target(target):
            return cls
    raise ConfigError(f"cannot tell the output format of {str(target)!r}; set format: one of {', '.join(writers.names())}")


def target_writer(
    plan: Plan,
    target: str | os.PathLike[str],
    *,
    format: str | None = None,
    shard_size: int | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Writer:
    """The writer that will write ``plan`` to ``target``, with what it stores beside the tensors.

    That is the source's own metadata where the writer's format can carry it, with
    ``metadata``'s fields set or deleted over it (:mod:`statebridge.writers.metadata`),
    and the run's provenance.
    """
    target = Path(target)
    writer = writer_for(target, format)(target, metadata=provenance(plan.fingerprint, plan.lineage), shard_size=shard_size)
    writer.source_offsets = plan.raw_offsets()
    writer.lineage = plan.lineage
    writer.carry(plan.source)
    edit_metadata(writer, metadata)
    fit_types(plan, writer)
    writer.fit(plan)
    fit_target(plan, writer)
    if plan.folder is not None and plan.folder.carried:  # so a later run knows these files as its own to replace
        writer.metadata[COMPANIONS_KEY] = json.dumps(plan.folder.carried_names())
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
    source: SourceLike | Plan,
    pipeline: PipelineLike,
    target: str | os.PathLike[str],
    *,
    writer: Writer | None = None,
    **options: Any,
) -> RunReport:
    """Stream ``source`` through ``pipeline`` into ``target``, atomically.

    ``options`` are :class:`~statebridge.options.RunOptions` (the keys of a
    config file).  The target (file or shard folder) appears only when
    everything was written and fsynced; on any error it is left as it was.
    From a model folder into a folder target, the companion files (config.json
    with the steps' edits, tokenizer, generation config, ...) are written with
    the tensors and committed with them (see :mod:`statebridge.planning.folder`).
    ``require``, ``expect``, ``on_collision`` and ``gates`` are checked on the
    plan first, as in :func:`plan`; ``source`` may be that plan (the CLI plans
    once, shows the plan, then runs it).  ``durable=False`` skips the fsyncs:
    the commit is still atomic for every process (an interrupted or failed run
    leaves nothing), but, as after a ``cp``, a power cut soon after may lose
    data the kernel had not written yet.

    Before anything is written the target policy (:mod:`statebridge.execute.targets`) is
    checked: a target that contains or lies inside the source is refused, and an
    existing target that statebridge did not write (or the source itself) is
    replaced only with ``overwrite=True``.  A source file replaced or modified
    during the run fails it before the commit.

    Under ``torchrun`` the run is collective: every rank calls it with the same
    arguments and does a share of the work (see :mod:`statebridge.execute.distributed`);
    ``distributed=False`` converts in this process alone, ``True`` also shares
    the work over a process group the caller initialised.

    ``writer``: the one :func:`target_writer` made for this plan, target and
    output options, when the caller has made it already (the command line makes
    it to show the estimate first): a plan of 200,000 tensors spends seconds on it.
    """
    settings: RunOptions = validated(RunOptions, options)
    target = Path(target)
    plan_options = {name: getattr(settings, name) for name in PlanOptions.model_fields}
    built = plan(source, pipeline, **plan_options)
    gates = Gates(installed().gates, settings.gates)
    with built.source, session(settings.distributed) as ranks:
        identity = built.source.identity()  # what is read from here on must be these files
        if writer is None or writer.path != target:
            writer = target_writer(built, target, format=settings.format, shard_size=settings.shard_size, metadata=settings.metadata)
        writer.durable = settings.durable
        policy = TargetPolicy(target, writer.writes_folder, built.source, named=source, overwrite=settings.overwrite)
        agree = {  # what every rank of a distributed run must have in common before any write
            "sources": identity.portable(),
            "steps": built.fingerprint,
            "output settings": (writer.format, settings.shard_size, sorted(writer.metadata.items()), settings.overwrite),
            "gate options": json.dumps(settings.gates, sort_keys=True, default=repr),
            "plans": plan_signature(built),
        }
        with rank_target(target, writer.writes_folder, ranks, settings.durable, policy=policy, agree=agree) as staging:
            if built.estimate is None:
                built.estimate = estimate(built, target, writer)
            if built.estimate.bytes_read or _computes_new(built):
                # Computing needs torch: import it before measuring, so the memory rise the report
                # shows is the run's tensors, not torch's own import (about 220 MB).
                import torch  # noqa: F401
            with PeakMemory() as memory:
                writer.path = staging
                try:
                    stats = execute(
                        built, writer, progress=settings.progress, gates=gates, max_memory=settings.max_memory,
                        workers=settings.workers, ranks=ranks,
                    )
                    files = writer.finish()
                    if built.folder is not None and built.folder.carried and (ranks is None or ranks.rank == 0):
                        files += built.folder.write(staging)  # staged with the tensors: committed with them
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
    share: bool = False,
    progress: bool | None = None,
    max_memory: int | None = None,
    workers: int = 1,
) -> Plan:
    """Fill ``model``'s parameters and buffers from ``source`` through ``pipeline``; all of them or none.

    Every tensor is computed, checked and staged first; the model is filled
    only once all succeeded, so a failure leaves it unchanged.  Works for
    meta-device models (tensors are assigned) and casts dtypes on the fly, but
    refuses casts that change integer values.  Tied names get one tensor, and
    different values for them are refused.  With ``strict``, every module key
    must be produced (a tie by any of its names) and no other key may be;
    ``strict=False`` loads the rest and warns with what it skipped.  Shape
    mismatches are always errors, raised before any data is read.  Assigned
    tensors never share memory with a dict or module source unless ``share``.
    See docs/trust.md, "Loading into a module".
    """
    with open_source(source) as src:
        built = plan(src, pipeline)
        writer = ModuleWriter(model, strict=strict, share=share, source=src, suggest=installed().hook.suggest_keys)
        fit_types(built, writer)  # a module holds no block types: a quantize to one is refused, not skipped
        try:
            execute(built, writer, progress=progress, max_memory=max_memory, workers=workers)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    left = set(writer.missing)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in left]
    if still_meta:
        warnings.warn(
            f"{len(still_meta)} tensors of {type(model).__name__} are still on the meta device because the "
            f"state dict does not hold them (non-persistent buffers?): {describe_keys(still_meta)}; build the "
            "model with parameters on meta and buffers real (e.g. accelerate.init_empty_weights()) or re-create them",
            RuntimeWarning,
            stacklevel=2,
        )
    return built


def _computes_new(built: Plan) -> bool:
    """Whether some group makes a tensor from no input by computing it (zero bytes, ``Group.zeros``, need no torch)."""
    return bool(built.new) and any(
        not group.inputs and len(built.raw_spans(group)) < len(group.outputs) for group in built.groups
    )
