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
from functools import partial
from itertools import groupby, islice
from operator import lt
from types import MappingProxyType
from typing import NamedTuple, cast

from ..errors import CollisionError, ExecutionError, PlanError, StatebridgeError

from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys, did_you_mean
from .base import ZEROS, Candidates, Carry, Group, Piece, Pieces, Tensors, Transform, WholeOf, cut

class Lineage(NamedTuple):
    """Which source tensors, through which operations, made one tensor."""

    sources: tuple[str, ...]
    ops: tuple[str, ...] = ()


#: builds a named tuple (a Lineage, a _Stage) without its Python-level ``__new__``
_new_lineage = tuple.__new__


class _Lineages(dict[str, Lineage]):
    """Lineage by key, where a key no step has touched is its own source.

    Such lineage is made when asked for, not stored: most keys of a large plan never
    need it before a step replaces it.
    """

    __slots__ = ()

    def __missing__(self, key: str) -> Lineage:
        return _new_lineage(Lineage, ((key,), ()))


class _Stage(NamedTuple):
    """One step's group inside a merged group: its step's position, its own, and the step's label."""

    step: int
    index: int
    label: str
    group: Group


#: ``_Component.live`` value of a source tensor a component read and still holds: its bytes are
#: the whole source tensor (no Piece is built for it: most tensors of a large plan are just that).
#: A unique object, compared by identity: an empty tuple would be CPython's one empty tuple,
#: which is also what a zero-byte tensor's pieces are.
_SOURCE: Pieces = cast("Pieces", object())


class _Component:
    """Groups of different steps that feed each other, merged as the steps are applied.

    Built only when a step reads what an earlier step wrote; a group that reads source
    tensors only stands for itself (its :class:`_Stage`) until then.
    """

    __slots__ = ("stages", "inputs", "live", "merged_into")

    def __init__(self) -> None:
        self.stages: list[_Stage] = []
        self.inputs: list[str] = []
        #: the keys this component currently holds, in order, each with the source bytes it is
        #: (``_SOURCE`` for a source tensor read whole), or None when they are computed
        self.live: dict[str, Pieces | None] = {}
        self.merged_into: _Component | None = None

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
    #: with ``compose(..., carried=True)``: every group that writes, in write order, untouched tensors' included
    ordered: list[Group] = field(default_factory=list)


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
    carried: bool = False,
) -> Composition:
    """Plan ``steps`` in sequence against ``metas`` and merge dependent groups.

    Two groups writing one key, or a group writing over a key its step keeps, is
    a :class:`CollisionError`; with ``on_collision="warn"`` the last writer wins
    and each collision is recorded in :attr:`Composition.collisions`.
    ``lineage`` continues an enclosing composition's (a composite step's own
    steps are traced back to the true sources); by default each key is its own source.
    ``carried`` also lists every group in write order in :attr:`Composition.ordered` (a plan's groups).
    """
    composer = _Composer(metas, lineage, on_collision)
    for index, step in enumerate(steps):
        composer.apply(index, f"{where}[{index}] ({step.name})", step)
    return composer.result(carried)


@dataclass
class _Planned:
    """One step's groups against the state, with what they mean for lineage and drops."""

    groups: list[Group]
    #: per group, the lineage of its outputs: one for all of them (a flat step's group), or one
    #: per output (a composite step's merged group, whose outputs have different histories)
    lineage: list[Lineage | dict[str, Lineage]]
    dropped: list[str]
    overwritten: list[str]
    collisions: list[str]


class _Composer:
    """The state, lineage and merged components of a composition, advanced one step at a time."""

    def __init__(self, metas: Mapping[str, TensorMeta], lineage: Mapping[str, Lineage] | None, on_collision: str) -> None:
        self.order = {k: i for i, k in enumerate(metas)}
        self.state: dict[str, TensorMeta] = dict(metas)
        self.lineage = _Lineages() if lineage is None else _Lineages({k: v for k, v in lineage.items() if k in metas})
        self.on_collision = on_collision
        #: what produced each key a step wrote: a stage that read only source tensors (most groups
        #: of a large plan: no component is built for them), or the component of merged stages
        self.producer: dict[str, _Stage | _Component] = {}
        self.units: list[_Stage | _Component] = []  # every stage that read only sources, and every component
        self.promoted: set[int] = set()  # ids of such stages that a later step merged into a component
        self.dropped: list[str] = []
        self.consumed: list[str] = []
        self.collisions: list[str] = []
        self.overwritten: list[str] = []

    def _plan(self, label: str, step: Transform) -> _Planned:
        if isinstance(step, Composite):
            try:
                nested = step.composition(MappingProxyType(self.state), MappingProxyType(self.lineage), self.on_collision)
            except StatebridgeError as e:
                raise e.within(label) from None
            return _Planned(
                nested.groups,
                [{key: nested.lineage[key] for key in group.outputs} for group in nested.groups],
                nested.dropped,
                nested.overwritten,
                [f"{label}: {note}" for note in nested.collisions],
            )
        try:  # a read-only view of the state, so a transform cannot edit what it plans against
            groups = list(step.plan(MappingProxyType(self.state)))
        except StatebridgeError as e:
            raise e.within(label) from None
        notes: list[str] = []
        groups = _check_step(label, groups, self.state, self.on_collision, notes)
        planned = _Planned(groups, [], [], [], notes)
        lineage = self.lineage
        joined: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}  # one ops tuple per distinct history
        for group in groups:
            inputs = group.inputs
            if len(inputs) == 1:  # most groups of a large plan: one tensor in, its lineage continued
                before = lineage.get(inputs[0])
                # a source tensor no step touched yet is its own source: the group's inputs tuple says so
                sources, prior = (inputs, ()) if before is None else before
                if group.ops:
                    ops = joined.get((prior, group.ops))
                    if ops is None:
                        ops = joined[(prior, group.ops)] = prior + tuple(group.ops)
                    after = _new_lineage(Lineage, (sources, ops))
                else:
                    after = before if before is not None else _new_lineage(Lineage, (sources, ()))
            else:
                sources = _union(lineage[k].sources for k in inputs)
                after = Lineage(sources, _union(lineage[k].ops for k in inputs) + tuple(group.ops))
            if not group.outputs:
                (planned.overwritten if OVERWRITTEN in group.ops else planned.dropped).extend(sources)
            planned.lineage.append(after)
        return planned

    def apply(self, index: int, label: str, step: Transform) -> None:
        planned = self._plan(label, step)
        state, producer, lineage = self.state, self.producer, self.lineage
        if not producer:  # no step wrote anything yet (the first step): every group reads source tensors only
            self._apply_to_sources(index, label, planned)
            return
        # Pass 1: read every group's inputs against the state before this step
        # (so a step may swap names), merging the components that feed each group.
        # ``units[i]`` is what group i joined: its own stage (it read source tensors only), or a
        # component, with the source bytes of each output in ``origins[i]``.
        units: list[_Stage | _Component] = []
        origins: dict[int, list[Pieces | None]] = {}
        consumed, all_units, new_tuple = self.consumed.extend, self.units.append, _new_lineage
        for gi, group in enumerate(planned.groups):
            stage = new_tuple(_Stage, (index, gi, label, group))
            comp = None
            for key in group.inputs:
                if key in producer:
                    other = self._component(producer[key])
                    comp = other.root() if comp is None else _merge(comp, other, producer)
            if comp is None:  # reads source tensors only: the stage stands for itself until a later step reads it
                consumed(group.inputs)
                all_units(stage)
                units.append(stage)
                continue
            for key in group.inputs:
                if key not in producer:
                    comp.inputs.append(key)
                    comp.live[key] = _SOURCE
                    self.consumed.append(key)
            comp.stages.append(stage)
            units.append(comp)
            origins[gi] = [_origin(group, key, comp.live) for key in group.outputs]
        forget_state, forget_lineage = state.pop, lineage.pop
        for gi, group in enumerate(planned.groups):
            if gi in origins:
                live = units[gi].root().live  # type: ignore[union-attr]
                for key in group.inputs:
                    producer.pop(key, None)
                    live.pop(key, None)
            for key in group.inputs:
                forget_state(key, None)
                forget_lineage(key, None)
        # Pass 2: the groups' outputs join the state.
        for gi, (group, after) in enumerate(zip(planned.groups, planned.lineage)):
            shared = after if type(after) is Lineage else None
            if gi not in origins:
                unit = units[gi]
                for key, meta in group.outputs.items():
                    state[key] = meta
                    lineage[key] = shared or after[key]  # type: ignore[index]
                    producer[key] = unit
                continue
            comp = units[gi].root()  # type: ignore[union-attr]
            live = comp.live
            for (key, meta), origin in zip(group.outputs.items(), origins[gi]):
                state[key] = meta
                lineage[key] = shared or after[key]  # type: ignore[index]
                producer[key] = comp
                live[key] = origin
        self._record(planned)

    def _apply_to_sources(self, index: int, label: str, planned: _Planned) -> None:
        """:meth:`apply` for a step none of whose groups reads a tensor an earlier step wrote.

        Each group stands for itself (no component to merge), so the passes of ``apply`` reduce
        to bulk list and dict work: a first step renaming 200,000 tensors is most of a large plan.
        """
        groups, state, lineage, producer = planned.groups, self.state, self.lineage, self.producer
        consumed, units = self.consumed, self.units
        first_read, first_unit = len(consumed), len(units)
        units.extend(_new_lineage(_Stage, (index, gi, label, group)) for gi, group in enumerate(groups))
        consumed.extend(key for group in groups for key in group.inputs)
        forget_state, forget_lineage = state.pop, lineage.pop
        for key in islice(consumed, first_read, None):  # (no copies of these lists: they hold 200,000 entries)
            forget_state(key, None)
            forget_lineage(key, None)
        for stage, after in zip(islice(units, first_unit, None), planned.lineage):
            outputs = stage.group.outputs  # type: ignore[union-attr]
            if type(after) is Lineage:
                state.update(outputs)
                for key in outputs:
                    lineage[key] = after
                    producer[key] = stage
            else:
                for key, meta in outputs.items():
                    state[key] = meta
                    lineage[key] = after[key]  # type: ignore[index]
                    producer[key] = stage
        self._record(planned)

    def _record(self, planned: _Planned) -> None:
        """Keep a planned step's drops, overwrites and collision notes."""
        self.dropped.extend(planned.dropped)
        self.overwritten.extend(planned.overwritten)
        self.collisions.extend(planned.collisions)

    def _component(self, unit: _Stage | _Component) -> _Component:
        """The component ``unit`` belongs to; a stage that stood for itself becomes one now."""
        if type(unit) is _Component:
            return unit
        stage: _Stage = unit  # type: ignore[assignment]
        comp = _Component()
        comp.stages.append(stage)
        comp.inputs.extend(stage.group.inputs)
        for key in stage.group.outputs:
            comp.live[key] = _declared(stage.group, key)
            self.producer[key] = comp
        self.units.append(comp)
        self.promoted.add(id(stage))
        return comp

    def result(self, carried: bool = False) -> Composition:
        """The composition; with ``carried``, :attr:`Composition.ordered` lists every group in write order,
        a rename-to-itself group for each tensor no step touched included."""
        # every component that consumed something, those whose outputs were all dropped included
        order, state = self.order, self.state
        groups: list[Group] = []
        positions: list[float] = []
        promoted = self.promoted
        for unit in self.units:
            if type(unit) is _Stage:
                if promoted and id(unit) in promoted:
                    continue
                group = unit.group  # type: ignore[union-attr]
                if not (type(group.compute) is Carry and type(group.pieces) is WholeOf and group.inputs == (group.pieces.source,)):
                    group = _stage_group(unit, order)  # type: ignore[arg-type]
            else:
                comp = unit.root()  # type: ignore[union-attr]
                if comp is not unit:
                    continue  # merged into another component, which is in the list too
                if len(comp.inputs) > 1:
                    comp.inputs.sort(key=order.__getitem__)  # read in storage order, however the steps were nested
                group = _merged_group(comp, {k: state[k] for k in comp.live})
            groups.append(group)
            positions.append(order[group.inputs[0]] if group.inputs else float("inf"))
        # storage order of the first input, ties (groups of no input) by first output; usually already so
        if not all(map(lt, positions, positions[1:])):
            ranked = sorted(range(len(groups)), key=lambda i: (positions[i], next(iter(groups[i].outputs), "")))
            groups, positions = [groups[i] for i in ranked], [positions[i] for i in ranked]
        final: dict[str, TensorMeta] = {}
        ordered: list[Group] = []
        at_group, count = 0, len(groups)
        for key, at in order.items():
            while at_group < count and positions[at_group] <= at:
                if groups[at_group].outputs:  # a drop writes nothing: not a group of the plan
                    final.update(groups[at_group].outputs)
                    ordered.append(groups[at_group])
                at_group += 1
            if key in state and key not in self.producer:
                final[key] = state[key]
                if carried:
                    ordered.append(Group.rename(key, key, state[key]))
        for group in groups[at_group:]:
            if group.outputs:
                final.update(group.outputs)
                ordered.append(group)
        # the composer is done: its per-key tables give their memory to the lineage built next
        # (a plan of 200,000 tensors peaks here)
        self.producer.clear()
        self.state.clear()
        self.order.clear()
        return Composition(
            groups=groups,
            metas=final,
            lineage={k: self.lineage[k] for k in final},
            dropped=self.dropped,
            consumed=self.consumed,
            collisions=self.collisions,
            overwritten=self.overwritten,
            ordered=ordered if carried else [],
        )


def _check_step(
    label: str, groups: list[Group], state: Mapping[str, TensorMeta], on_collision: str, notes: list[str]
) -> list[Group]:
    """Every input exists and is read once; no target is written twice or over a kept tensor.

    Returns the groups to run: unchanged, or with collisions resolved in favour
    of the last writer when ``on_collision="warn"`` (each one noted in ``notes``).
    """
    # The usual case, checked with sets (a step renaming 200,000 tensors): every input in the state,
    # none read twice, no output written twice or over a tensor the step keeps.  Anything else
    # goes through the loops below, which find the first fault and name it.
    reads = [key for group in groups for key in group.inputs]
    writes = [key for group in groups for key in group.outputs]
    read, written = set(reads), set(writes)
    if len(read) == len(reads) and len(written) == len(writes) and read <= state.keys() and written & state.keys() <= read:
        return groups
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


def _declared(group: Group, key: str) -> Pieces | None:
    """The source bytes output ``key`` is, for a group that read only source tensors: its pieces as declared."""
    pieces = group.pieces.get(key) if group.pieces else None
    if pieces is None or any(piece.key not in group.inputs and piece.key != ZEROS for piece in pieces):
        return None
    return pieces


def _stage_group(stage: _Stage, order: Mapping[str, int]) -> Group:
    """The group to run for a stage that read only source tensors and whose outputs no later step read.

    (A rename of one source tensor, ``Group.rename``, is its own group: ``result`` takes it as it is.)
    """
    group = stage.group
    inputs = group.inputs if len(group.inputs) < 2 else tuple(sorted(group.inputs, key=order.__getitem__))
    pieces = group.pieces
    if pieces is not None and (len(pieces) != len(group.outputs) or any(_declared(group, k) is None for k in group.outputs)):
        pieces = None
    if isinstance(group.compute, Carry) and inputs is group.inputs and pieces is group.pieces:
        return group  # a rename of a source tensor: nothing to check or order, and no copy to keep
    return Group(
        inputs=inputs,
        outputs=group.outputs,
        compute=partial(_run_stages, ((stage,),), tuple(group.outputs)),
        ops=group.ops if len(group.ops) < 2 else _union((group.ops,)),
        pieces=pieces if group.outputs else None,
        effort=group.effort,
    )


def _origin(group: Group, key: str, live: Mapping[str, Pieces | None]) -> Pieces | None:
    """The source bytes output ``key`` of ``group`` is made of, when they are known and untouched."""
    pieces = group.pieces.get(key) if group.pieces else None
    if pieces is None:
        return None
    if len(pieces) == 1 and live.get(pieces[0].key) is _SOURCE:  # a source tensor, renamed or cut: as declared
        return pieces
    out: list[Piece] = []
    for piece in pieces:
        source = live.get(piece.key)
        if source is None:
            return None
        out.extend((piece,) if source is _SOURCE else cut(source, piece.offset, piece.length))
    return tuple(out)


def _merged_group(comp: _Component, outputs: dict[str, TensorMeta]) -> Group:
    """One group doing, on its own tensors, what each of the component's stages did, step by step."""
    stages = sorted(comp.stages, key=lambda s: (s.step, s.index))
    by_step = tuple(tuple(step) for _, step in groupby(stages, key=lambda s: s.step))
    pieces = {k: comp.live[k] for k in outputs if comp.live.get(k) is not None}
    return Group(
        inputs=tuple(comp.inputs),
        outputs=outputs,
        compute=partial(_run_stages, by_step, tuple(outputs)),
        ops=_union(stage.group.ops for stage in stages),
        pieces=pieces if len(pieces) == len(outputs) and outputs else None,
        effort=sum(stage.group.passes for stage in stages) if any(s.group.effort is not None for s in stages) else None,
    )


def _run_stages(by_step: Sequence[Sequence[_Stage]], outputs: Sequence[str], tensors: Tensors) -> Tensors:
    """Compute a merged group: each step's stages in turn, checking each produced what it planned."""
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
                        raise ExecutionError(f"{stage.label}: produced {key!r} as {TensorMeta.of(tensor)} but planned {meta}")
                live[key] = value
    return {k: live[k] for k in outputs}


def _union(parts) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for part in parts for item in part))
