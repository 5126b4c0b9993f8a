"""Composition: steps in sequence, steps side by side, and steps scoped to a key prefix.

A :class:`Pipeline` is itself a transform, so pipelines nest.  Steps are given
as transform objects or in config form (``{"rename": {...}}``).  Each of these
is a :class:`~statebridge.transforms.compose.Composite`: it plans by composing
its steps against the enclosing state and lineage, so a nested step behaves,
is counted and is inverted exactly as it would be at the top level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import ConfigDict, ValidationInfo, field_validator

from .compose import Composite, Composition, Lineage, compose
from ..errors import CollisionError, ConfigError, NotInvertibleError, PlanError, StatebridgeError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys, did_you_mean
from .base import CONFIG, Companions, Group, Params, Transform


def build_steps(steps: Sequence[Any], transforms: Any = None, where: str = "steps") -> list[Transform]:
    """Turn config-form steps (``{name: params}``) into transforms with the catalog ``transforms``.

    Transform objects pass as they are.  The catalog comes from the caller (the
    API and config layers hold the installed plugins); without one, only
    transform objects are accepted.
    """
    out = []
    for i, step in enumerate(steps):
        if isinstance(step, Transform):
            out.append(step)
        elif transforms is None:
            raise ConfigError(
                f"{where}[{i}]: a step in config form ({step!r}) needs the installed transforms to be built; "
                "build the steps with statebridge.as_pipeline([...]) or give them to statebridge.plan/run/load_into"
            )
        else:
            out.append(transforms.build(step, f"{where}[{i}]"))
    return out


class _StepsParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    steps: list[Any]

    @field_validator("steps")
    @classmethod
    def _build(cls, steps: list[Any], info: ValidationInfo) -> list[Transform]:
        context = info.context or {}
        return build_steps(steps, context.get("transforms"), where=f"{context.get('step') or 'composite'}.steps")


class _Composite(Composite):
    Params = _StepsParams

    def __init__(self, steps: Sequence[Any] | Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        if isinstance(steps, Mapping):
            kwargs, steps = {**steps, **kwargs}, None
        elif steps is not None and not isinstance(steps, Params):
            kwargs["steps"], steps = list(steps), None
        if isinstance(kwargs.get("steps"), list):  # built here, so an error names this step: sequential.steps[1]
            kwargs["steps"] = build_steps(kwargs["steps"], where=f"{self.name}.steps")
        super().__init__(steps, **kwargs)

    def config_edits(self, metas: Mapping[str, TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """config.json's share of :meth:`companion_edits`, which the composites implement for every file."""
        return self.companion_edits(metas, Companions.of({CONFIG: config})).get(CONFIG, {})

    @property
    def steps(self) -> list[Transform]:
        return self.params.steps

    def spec(self) -> dict[str, Any]:
        extra = self.params.model_dump(mode="json", exclude={"steps"})
        return {self.name: {**extra, "steps": [s.spec() for s in self.steps]}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.steps!r})"


def checked_inverse(step: Transform, before: Mapping[str, TensorMeta], forward: Composition | None = None) -> Transform:
    """``step.inverse(before)``, refused unless it undoes exactly what ``step`` changed.

    Planned against the state ``step`` leaves, the inverse must read only
    tensors the step wrote and give back the state before the step, every name,
    shape and dtype; a tensor the step left alone must stay alone (a cast's
    inverse must not cast what was already in the target dtype).  This holds
    every transform's inverse, built in or from a plugin, to one rule.
    """
    forward = forward if forward is not None else compose([step], before)
    inverse = step.inverse(before)
    back = compose([inverse], forward.metas, where="inverse")
    written = {key for group in forward.groups for key in group.outputs}
    stray = [key for key in back.consumed if key not in written]
    if stray:
        raise NotInvertibleError(
            f"its inverse ({inverse.name}) would also change {describe_keys(stray)}, which this step left alone"
        )
    before = dict(before)
    wrong = [key for key in {**before, **back.metas} if before.get(key) != back.metas.get(key)]
    if wrong:
        raise NotInvertibleError(f"its inverse ({inverse.name}) does not give back {describe_keys(wrong)} as it was")
    return inverse


class Pipeline(_Composite):
    """Steps applied one after another; each sees the state the previous ones left."""
    name = "sequential"

    def composition(self, metas: Mapping[str, TensorMeta], lineage: Mapping[str, Lineage], on_collision: str) -> Composition:
        return compose(self.steps, metas, on_collision=on_collision, lineage=lineage)

    def companion_edits(self, metas: Mapping[str, TensorMeta], companions: Companions) -> dict[str, dict[str, Any]]:
        """Each step's edits, made against the state and the files the steps before it leave; later ones win."""
        edits: dict[str, dict[str, Any]] = {}
        state, current = dict(metas), companions
        for i, step in enumerate(self.steps):
            try:
                made = step.companion_edits(state, current)
            except StatebridgeError as e:
                raise e.within(f"steps[{i}] ({step.name})") from None
            for name, values in made.items():
                edits.setdefault(name, {}).update(values)
            current = current.edited(made)
            if i + 1 < len(self.steps):
                # collisions were decided when the plan was built; here only the resulting state matters
                state = compose([step], state, on_collision="warn").metas
        return edits

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        state, steps = dict(metas), []
        for i, step in enumerate(self.steps):
            forward = compose([step], state)
            steps.append((i, step, state, forward))
            state = forward.metas
        inverses = []
        for i, step, before, forward in reversed(steps):
            try:
                inverses.append(checked_inverse(step, before, forward))
            except StatebridgeError as e:
                raise e.within(f"steps[{i}] ({step.name})") from None
        return Pipeline(inverses)


Sequential = Pipeline


class Parallel(_Composite):
    """Independent steps planned against the same state; they must read and write disjoint keys."""
    name = "parallel"

    def composition(self, metas: Mapping[str, TensorMeta], lineage: Mapping[str, Lineage], on_collision: str) -> Composition:
        parts = [
            compose([step], metas, where=f"parallel[{i}]", on_collision=on_collision, lineage=lineage)
            for i, step in enumerate(self.steps)
        ]
        readers: dict[str, int] = {}
        writers: dict[str, int] = {}
        for i, part in enumerate(parts):
            for group in part.groups:
                for key in group.inputs:
                    if key in readers:
                        raise PlanError(f"parallel steps [{readers[key]}] and [{i}] both read {key!r}; run them in sequence")
                    readers[key] = i
                for key in group.outputs:
                    if key in writers:
                        raise CollisionError(f"parallel steps [{writers[key]}] and [{i}] both write {key!r}")
                    writers[key] = i
        groups = [group for part in parts for group in part.groups]
        kept = [key for key in metas if key not in readers]
        written = {key: (part, meta) for part in parts for group in part.groups for key, meta in group.outputs.items()}
        return Composition(
            groups=groups,
            metas={**{key: metas[key] for key in kept}, **{key: meta for key, (_, meta) in written.items()}},
            lineage={**{key: lineage[key] for key in kept}, **{key: part.lineage[key] for key, (part, _) in written.items()}},
            dropped=[key for part in parts for key in part.dropped],
            consumed=list(readers),
            collisions=[note for part in parts for note in part.collisions],
            overwritten=[key for part in parts for key in part.overwritten],
        )

    def companion_edits(self, metas: Mapping[str, TensorMeta], companions: Companions) -> dict[str, dict[str, Any]]:
        """Every step's edits, each made against the same state and files; two steps may not set one key differently."""
        edits: dict[str, dict[str, Any]] = {}
        by: dict[tuple[str, str], int] = {}
        for i, step in enumerate(self.steps):
            try:
                made = step.companion_edits(metas, companions)
            except StatebridgeError as e:
                raise e.within(f"parallel[{i}] ({step.name})") from None
            for name, values in made.items():
                file = edits.setdefault(name, {})
                for key, value in values.items():
                    if key in file and file[key] != value:
                        raise PlanError(f"parallel steps [{by[name, key]}] and [{i}] both edit {name}'s {key!r}, differently")
                    file[key], by[name, key] = value, i
        return edits

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        inverses = []
        for i, step in enumerate(self.steps):
            try:
                inverses.append(checked_inverse(step, metas))
            except StatebridgeError as e:
                raise e.within(f"parallel[{i}] ({step.name})") from None
        return Parallel(inverses)


class Scope(_Composite):
    """Run steps on the keys under ``prefix`` as if the prefix were not there; other keys pass through."""
    name = "scope"

    class Params(_StepsParams):
        prefix: str

    def _inner(self, metas: Mapping[str, TensorMeta]) -> dict[str, TensorMeta]:
        prefix = self.params.prefix
        inner = {k[len(prefix) :]: m for k, m in metas.items() if k.startswith(prefix)}
        if not inner:
            prefixes = {k[: i + 1] for k in metas for i, c in enumerate(k) if c == "."}
            raise PlanError(
                f"no key starts with prefix {prefix!r} (keys look like {describe_keys(list(metas)[:3])})"
                + did_you_mean(prefix, prefixes)
            )
        return inner

    def composition(self, metas: Mapping[str, TensorMeta], lineage: Mapping[str, Lineage], on_collision: str) -> Composition:
        prefix = self.params.prefix
        inner = self._inner(metas)
        nested = compose(
            self.steps, inner, where="scope.steps", on_collision=on_collision, lineage={k: lineage[prefix + k] for k in inner}
        )
        outside = [k for k in metas if not k.startswith(prefix)]
        return Composition(
            groups=[_prefixed(g, prefix) for g in nested.groups],
            metas={**{k: metas[k] for k in outside}, **{prefix + k: m for k, m in nested.metas.items()}},
            lineage={**{k: lineage[k] for k in outside}, **{prefix + k: v for k, v in nested.lineage.items()}},
            dropped=nested.dropped,
            consumed=[prefix + k for k in nested.consumed],
            collisions=nested.collisions,
            overwritten=nested.overwritten,
        )

    def companion_edits(self, metas: Mapping[str, TensorMeta], companions: Companions) -> dict[str, dict[str, Any]]:
        """The steps' edits, made against the scope's tensors alone (the prefix removed), as in :meth:`plan`."""
        return Pipeline(self.steps).companion_edits(self._inner(metas), companions)

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        return Scope(prefix=self.params.prefix, steps=[Pipeline(self.steps).inverse(self._inner(metas))])


def _prefixed(group: Group, prefix: str) -> Group:
    def compute(tensors: dict) -> dict:
        out = group.compute({k[len(prefix) :]: v for k, v in tensors.items()})
        return {prefix + k: v for k, v in out.items()}

    return Group(
        inputs=tuple(prefix + k for k in group.inputs),
        outputs={prefix + k: m for k, m in group.outputs.items()},
        compute=compute,
        ops=group.ops,
        pieces={prefix + k: tuple(p._replace(key=prefix + p.key) for p in v) for k, v in group.pieces.items()}
        if group.pieces
        else None,
        effort=group.effort,
    )
