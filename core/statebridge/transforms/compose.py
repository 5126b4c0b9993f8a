"""Sequential composition of steps into one set of independent groups.

Each step plans against the state the previous steps leave (metadata only).
Groups of different steps that feed each other are merged, so the composed
pipeline is again a set of disjoint groups, each reading only source tensors
and writing only final tensors.  Executing a merged group runs its steps in
order on that group's tensors alone: one pass over the data, however many
steps the pipeline has.

A step made of steps (sequential, parallel, scope: a :class:`Composite`) is
not planned as an opaque set of groups: it composes its own steps against the
same state *and lineage* and hands back a :class:`Composition`, whose drops,
lineage and collisions the enclosing composition adopts.  So a nested step is
planned, counted, traced, executed and inverted exactly as it would be at the
top level: a ``drop`` inside a ``sequential`` drops, and is reported.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import TypeVar

from ..errors import CollisionError, ExecutionError, PlanError, StatebridgeError

from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys, did_you_mean
from .base import Candidates, Group, Piece, Pieces, Tensors, Transform, cut, whole

V = TypeVar("V")


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

    groups: list[Group]  # merged groups, over the keys some step consumed; one with no outputs was dropped
    metas: dict[str, TensorMeta]  # the state after every step, pass-through keys included
    lineage: dict[str, Lineage]  # for every key of ``metas``
    dropped: list[str]  # source keys consumed with no output (an explicit drop)
    consumed: list[str]  # keys of the starting state some step read
    collisions: list[str] = field(default_factory=list)  # what on_collision="warn" let through
    overwritten: list[str] = field(default_factory=list)  # source keys lost to those collisions


class Composite(Transform):
    """A step made of steps (sequential, parallel, scope).

    It plans by composing its steps (:meth:`composition`), so the enclosing
    composition sees every nested group, drop, lineage entry and collision, as
    if the nested steps were written at the top level.
    """

    @abstractmethod
    def composition(self, metas: Mapping[str, TensorMeta], lineage: Mapping[str, Lineage], on_collision: str) -> Composition:
        """Compose this step's steps against ``metas``, continuing ``lineage`` (which covers every key of ``metas``)."""

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        return self.composition(metas, {k: Lineage((k,)) for k in metas}, "error").groups


#: the op recorded when a collision under ``on_collision="warn"`` discards a tensor
OVERWRITTEN = "overwritten (on_collision: warn)"


def compose(
    steps: Sequence[Transform],
    metas: Mapping[str, TensorMeta],
    where: str = "steps",
    on_collision: str = "error",
    lineage: Mapping[str, Lineage] | None = None,
) -> Composition:
    """Plan ``steps`` in sequence against ``metas`` and merge dependent groups.

    Two groups writing one key, or a group writing over a key its step keeps, is
    a :class:`CollisionError`; with ``on_collision="warn"`` the last writer wins
    and each collision is recorded in :attr:`Composition.collisions`.
    ``lineage`` continues an enclosing composition's (a composite step's own
    steps are traced back to the true sources); by default each key is its own source.
    """
    composer = _Composer(metas, lineage, on_collision)
    for index, step in enumerate(steps):
        composer.apply(index, f"{where}[{index}] ({step.name})", step)
    return composer.result()


@dataclass
class _Planned:
    """One step's groups against the state, with what they mean for lineage and drops."""

    groups: list[Group]
    lineage: dict[str, Lineage]  # for every output of ``groups``
    dropped: list[str]
    overwritten: list[str]
    collisions: list[str]


class _Composer:
    """The state, lineage and merged components of a composition, advanced one step at a time."""

    def __init__(self, metas: Mapping[str, TensorMeta], lineage: Mapping[str, Lineage] | None, on_collision: str) -> None:
        self.order = {k: i for i, k in enumerate(metas)}
        self.state: dict[str, TensorMeta] = dict(metas)
        self.lineage: dict[str, Lineage] = {k: lineage[k] for k in metas} if lineage is not None else {k: Lineage((k,)) for k in metas}
        self.on_collision = on_collision
        self.producer: dict[str, _Component] = {}
        self.components: list[_Component] = []
        self.dropped: list[str] = []
        self.consumed: list[str] = []
        self.collisions: list[str] = []
        self.overwritten: list[str] = []

    def _plan(self, label: str, step: Transform) -> _Planned:
        if isinstance(step, Composite):
            try:
                nested = step.composition(_ReadOnly(self.state), _ReadOnly(self.lineage), self.on_collision)
            except StatebridgeError as e:
                raise e.within(label) from None
            return _Planned(
                nested.groups,
                {key: nested.lineage[key] for group in nested.groups for key in group.outputs},
                nested.dropped,
                nested.overwritten,
                [f"{label}: {note}" for note in nested.collisions],
            )
        try:
            groups = list(step.plan(_ReadOnly(self.state)))
        except StatebridgeError as e:
            raise e.within(label) from None
        notes: list[str] = []
        groups = _check_step(label, groups, self.state, self.on_collision, notes)
        planned = _Planned(groups, {}, [], [], notes)
        for group in groups:
            sources = _union(self.lineage[k].sources for k in group.inputs)
            ops = _union(self.lineage[k].ops for k in group.inputs) + tuple(group.ops)
            if not group.outputs:
                (planned.overwritten if OVERWRITTEN in group.ops else planned.dropped).extend(sources)
            for key in group.outputs:
                planned.lineage[key] = Lineage(sources, ops)
        return planned

    def apply(self, index: int, label: str, step: Transform) -> None:
        planned = self._plan(label, step)
        state, producer = self.state, self.producer
        # Pass 1: read every group's inputs against the state before this step
        # (so a step may swap names), merging the components that feed each group.
        pending = []
        for gi, group in enumerate(planned.groups):
            comp = _Component()
            self.components.append(comp)
            for key in group.inputs:
                if key in producer:
                    comp = _merge(comp, producer[key], producer)
            for key in group.inputs:
                if key not in producer:
                    comp.inputs.append(key)
                    comp.raw[key] = whole(key, state[key])
                    self.consumed.append(key)
            comp.stages.append((index, gi, _Stage(label, group)))
            pending.append((group, comp, {key: _origin(group, key, comp.raw) for key in group.outputs}))
        for group, comp, _ in pending:
            comp = comp.root()
            for key in group.inputs:
                producer.pop(key, None)
                comp.live.pop(key, None)
                comp.raw.pop(key, None)
                state.pop(key, None)
                self.lineage.pop(key, None)
        # Pass 2: the groups' outputs join the state.
        for group, comp, origins in pending:
            comp = comp.root()
            for key, meta in group.outputs.items():
                state[key] = meta
                self.lineage[key] = planned.lineage[key]
                producer[key] = comp
                comp.live[key] = None
                comp.raw[key] = origins[key]
        self.dropped.extend(planned.dropped)
        self.overwritten.extend(planned.overwritten)
        self.collisions.extend(planned.collisions)

    def result(self) -> Composition:
        # every component that consumed something, those whose outputs were all dropped included
        units: list[tuple[float, str, Group]] = []
        for comp in _unique(c.root() for c in self.components):
            outputs = {k: self.state[k] for k in comp.live}
            comp.inputs.sort(key=self.order.__getitem__)  # read in storage order, however the steps were nested
            position = self.order[comp.inputs[0]] if comp.inputs else float("inf")
            units.append((position, next(iter(outputs), ""), _merged_group(comp, outputs)))
        units.sort(key=lambda u: (u[0], u[1]))
        final: dict[str, TensorMeta] = {}
        pending = iter(units)
        unit = next(pending, None)
        for key, at in self.order.items():
            while unit is not None and unit[0] <= at:
                final.update(unit[2].outputs)
                unit = next(pending, None)
            if key in self.state and key not in self.producer:
                final[key] = self.state[key]
        while unit is not None:
            final.update(unit[2].outputs)
            unit = next(pending, None)
        return Composition(
            groups=[u[2] for u in units],
            metas=final,
            lineage={k: self.lineage[k] for k in final},
            dropped=self.dropped,
            consumed=self.consumed,
            collisions=self.collisions,
            overwritten=self.overwritten,
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
                by = "twice by one group" if readers[key] is group else "by two groups"
                raise PlanError(f"{label}: {key!r} is read {by}; a step may consume each tensor once")
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
    ordered = sorted(comp.stages, key=lambda s: (s[0], s[1]))
    stages = [stage for _, _, stage in ordered]
    by_step = [[stage for _, _, stage in step] for _, step in groupby(ordered, key=lambda s: s[0])]
    pieces = {k: comp.raw[k] for k in outputs if comp.raw.get(k) is not None}

    def compute(tensors: Tensors) -> Tensors:
        live = dict(tensors)
        for step in by_step:
            # every group of a step reads the state before the step (a step may swap names), then all write
            results = [(stage, stage.group.compute({k: live.pop(k) for k in stage.group.inputs})) for stage in step]
            for stage, produced in results:
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


class _ReadOnly(Mapping[str, V]):
    """A read-only view of the state (or its lineage), so a transform cannot edit what it plans against."""

    def __init__(self, data: Mapping[str, V]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> V:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)
