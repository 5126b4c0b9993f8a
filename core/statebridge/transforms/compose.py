"""Sequential composition of steps into one set of independent groups.

Each step plans against the state the previous steps leave (metadata only).
Groups of different steps that feed each other are merged, so the composed
pipeline is again a set of disjoint groups, each reading only source tensors
and writing only final tensors.  Executing a merged group runs its steps in
order on that group's tensors alone: one pass over the data, however many
steps the pipeline has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import CollisionError, ExecutionError, PlanError, StatebridgeError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys, did_you_mean
from .base import Candidates, Group, Piece, Pieces, Tensors, cut, whole

if TYPE_CHECKING:
    from .base import Transform


@dataclass(frozen=True)
class Lineage:
    """Which source tensors, through which operations, made one tensor."""

    sources: tuple[str, ...]
    ops: tuple[str, ...] = ()


@dataclass
class _Stage:
    label: str
    group: Group


@dataclass
class _Component:
    stages: list[tuple[int, int, _Stage]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    live: dict[str, None] = field(default_factory=dict)  # keys this component currently holds, in order
    raw: dict[str, Pieces | None] = field(default_factory=dict)  # live key -> the source bytes it is, if any
    merged_into: "_Component | None" = None

    def root(self) -> "_Component":
        comp = self
        while comp.merged_into is not None:
            comp = comp.merged_into
        return comp


def _merge(comp: _Component, other: _Component, producer: dict[str, _Component]) -> _Component:
    """Fold ``other`` into ``comp`` (both roots or not); return the surviving root."""
    comp, other = comp.root(), other.root()
    if comp is other:
        return comp
    comp.stages.extend(other.stages)
    comp.inputs.extend(other.inputs)
    comp.live.update(other.live)
    comp.raw.update(other.raw)
    other.merged_into = comp
    for key in other.live:
        producer[key] = comp
    return comp


@dataclass
class Composition:
    """The result of composing steps against a state."""

    groups: list[Group]  # merged groups, over the keys some step consumed
    metas: dict[str, TensorMeta]  # the state after every step, pass-through keys included
    lineage: dict[str, Lineage]  # for every key of ``metas``
    dropped: list[str]  # source keys consumed with no output (an explicit drop)
    consumed: list[str]  # source keys some step read
    collisions: list[str] = field(default_factory=list)  # what on_collision="warn" let through
    overwritten: list[str] = field(default_factory=list)  # source keys lost to those collisions


#: the op recorded when a collision under ``on_collision="warn"`` discards a tensor
OVERWRITTEN = "overwritten (on_collision: warn)"


def compose(
    steps: Sequence["Transform"], metas: Mapping[str, TensorMeta], where: str = "steps", on_collision: str = "error"
) -> Composition:
    """Plan ``steps`` in sequence against ``metas`` and merge dependent groups.

    Two groups writing one key, or a group writing over a key its step keeps, is
    a :class:`CollisionError`; with ``on_collision="warn"`` the last writer wins
    and each collision is recorded in :attr:`Composition.collisions`.
    """
    order = {k: i for i, k in enumerate(metas)}
    state: dict[str, TensorMeta] = dict(metas)
    lineage: dict[str, Lineage] = {k: Lineage((k,)) for k in metas}
    producer: dict[str, _Component] = {}
    dropped: list[str] = []
    consumed_sources: list[str] = []
    collisions: list[str] = []
    overwritten: list[str] = []

    for index, step in enumerate(steps):
        label = f"{where}[{index}] ({step.name})"
        try:
            groups = step.plan(_ReadOnly(state))
        except StatebridgeError as e:
            raise e.within(label) from None
        groups = _check_step(label, list(groups), state, on_collision, collisions)
        # Pass 1: read every group's inputs against the state before this step
        # (so a step may swap names), merging the components that feed each group.
        pending = []
        for gi, group in enumerate(groups):
            comp = _Component()
            for key in group.inputs:
                if key in producer:
                    comp = _merge(comp, producer[key], producer)
            for key in group.inputs:
                if key not in producer:
                    comp.inputs.append(key)
                    comp.raw[key] = whole(key, state[key])
                    consumed_sources.append(key)
            comp.stages.append((index, gi, _Stage(label, group)))
            origins = {key: _origin(group, key, comp.raw) for key in group.outputs}
            sources = _union(lineage[k].sources for k in group.inputs)
            ops = _union(lineage[k].ops for k in group.inputs) + tuple(group.ops)
            if not group.outputs:
                (overwritten if OVERWRITTEN in group.ops else dropped).extend(sources)
            pending.append((group, comp, origins, sources, ops))
        for group, comp, *_ in pending:
            comp = comp.root()
            for key in group.inputs:
                producer.pop(key, None)
                comp.live.pop(key, None)
                comp.raw.pop(key, None)
                state.pop(key, None)
                lineage.pop(key, None)
        # Pass 2: the groups' outputs join the state.
        for group, comp, origins, sources, ops in pending:
            comp = comp.root()
            for key, meta in group.outputs.items():
                state[key] = meta
                lineage[key] = Lineage(sources, ops)
                producer[key] = comp
                comp.live[key] = None
                comp.raw[key] = origins[key]

    components = _unique(producer.values())
    # components whose every output was dropped still count as consumed; they need no execution
    units: list[tuple[float, str, Group]] = []
    for comp in components:
        outputs = {k: state[k] for k in comp.live}
        position = min((order[k] for k in comp.inputs), default=float("inf"))
        units.append((position, next(iter(outputs)), _merged_group(comp, outputs)))
    units.sort(key=lambda u: (u[0], u[1]))
    final: dict[str, TensorMeta] = {}
    pending = iter(units)
    unit = next(pending, None)
    for key in metas:
        while unit is not None and unit[0] <= order[key]:
            final.update(unit[2].outputs)
            unit = next(pending, None)
        if key in state and key not in producer:
            final[key] = state[key]
    while unit is not None:
        final.update(unit[2].outputs)
        unit = next(pending, None)
    return Composition(
        groups=[u[2] for u in units],
        metas=final,
        lineage={k: lineage[k] for k in final},
        dropped=dropped,
        consumed=consumed_sources,
        collisions=collisions,
        overwritten=overwritten,
    )


def _check_step(
    label: str, groups: list[Group], state: Mapping[str, TensorMeta], on_collision: str, notes: list[str]
) -> list[Group]:
    """Every input exists and is read once; no target is written twice or over a kept tensor.

    Returns the groups to run: unchanged, or with collisions resolved in favour
    of the last writer when ``on_collision="warn"`` (each one noted in ``notes``).
    """
    readers: dict[str, Group] = {}
    writers: dict[str, int] = {}
    for group in groups:
        for key in group.inputs:
            if key not in state:
                raise PlanError(f"{label}: source key {key!r} is not in the state{did_you_mean(key, state)}")
            if key in readers:
                raise PlanError(f"{label}: {key!r} is read by two groups; a step may consume each tensor once")
            readers[key] = group
    for i, group in enumerate(list(groups)):
        for key in group.outputs:
            if key in writers:
                earlier = groups[writers[key]]
                message = (
                    f"{label}: target {key!r} would be written twice, from [{describe_keys(earlier.inputs)}] "
                    f"and from [{describe_keys(group.inputs)}]"
                )
                if on_collision != "warn":
                    raise CollisionError(message)
                notes.append(f"{message}; kept the last (on_collision: warn)")
                groups[writers[key]] = replace(
                    earlier, outputs={k: m for k, m in earlier.outputs.items() if k != key}, ops=(*earlier.ops, OVERWRITTEN)
                )
            writers[key] = i
    for key, i in writers.items():
        if key in state and key not in readers:
            message = (
                f"{label}: target {key!r} (from [{describe_keys(groups[i].inputs)}]) would overwrite the existing "
                f"tensor {key!r}, which this step keeps"
            )
            if on_collision != "warn":
                raise CollisionError(message + "; drop or rename it first")
            notes.append(f"{message}; it was replaced (on_collision: warn)")
            groups.append(Group(inputs=(key,), outputs={}, compute=lambda t: {}, ops=(OVERWRITTEN,)))
    return groups


def _origin(group: Group, key: str, raw: Mapping[str, Pieces | None]) -> Pieces | None:
    """The source bytes output ``key`` of ``group`` is made of, when they are known and untouched."""
    if not group.pieces or key not in group.pieces:
        return None
    out: list[Piece] = []
    for piece in group.pieces[key]:
        source = raw.get(piece.key)
        if source is None:
            return None
        out.extend(cut(source, piece.offset, piece.length))
    return tuple(out)


def _merged_group(comp: _Component, outputs: dict[str, TensorMeta]) -> Group:
    stages = [stage for _, _, stage in sorted(comp.stages, key=lambda s: (s[0], s[1]))]
    pieces = {k: comp.raw[k] for k in outputs if comp.raw.get(k) is not None}

    def compute(tensors: Tensors) -> Tensors:
        live = dict(tensors)
        for stage in stages:
            produced = stage.group.compute({k: live.pop(k) for k in stage.group.inputs})
            for key, meta in stage.group.outputs.items():
                if key not in produced:
                    raise ExecutionError(f"{stage.label}: planned to produce {key!r} but did not")
                value = produced[key]
                for tensor in value.options if isinstance(value, Candidates) else (value,):
                    if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
                        raise ExecutionError(
                            f"{stage.label}: produced {key!r} as {TensorMeta.of(tensor)} but planned {meta}"
                        )
                live[key] = value
        return {k: live[k] for k in outputs}

    return Group(
        inputs=tuple(comp.inputs),
        outputs=outputs,
        compute=compute,
        ops=_union(stage.group.ops for stage in stages),
        pieces=pieces if len(pieces) == len(outputs) and outputs else None,
        effort=sum(stage.group.passes for stage in stages) if any(s.group.effort is not None for s in stages) else None,
    )


def _union(parts) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for part in parts for item in part))


def _unique(components) -> list[_Component]:
    seen: dict[int, _Component] = {}
    for comp in components:
        seen.setdefault(id(comp), comp)
    return list(seen.values())


class _ReadOnly(Mapping[str, TensorMeta]):
    """A read-only view of the state, so a transform cannot edit what it plans against."""

    def __init__(self, data: Mapping[str, TensorMeta]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> TensorMeta:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)
