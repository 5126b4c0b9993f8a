"""Composition: steps in sequence, steps side by side, and steps scoped to a key prefix.

A :class:`Pipeline` is itself a transform, so pipelines nest.  Steps are given
as transform objects or in config form (``{"rename": {...}}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import ConfigDict, ValidationInfo, field_validator

from .compose import compose
from ..errors import CollisionError, ConfigError, PlanError, StatebridgeError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys
from .base import Group, Params, Transform


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
        return build_steps(steps, (info.context or {}).get("transforms"))


class _Composite(Transform):
    Params = _StepsParams

    def __init__(self, steps: Sequence[Any] | None = None, /, **kwargs: Any) -> None:
        if steps is not None and not isinstance(steps, (Mapping, self.Params)):
            kwargs["steps"] = list(steps)
            steps = None
        super().__init__(steps, **kwargs)

    @property
    def steps(self) -> list[Transform]:
        return self.params.steps

    def spec(self) -> dict[str, Any]:
        extra = self.params.model_dump(mode="json", exclude={"steps"})
        return {self.name: {**extra, "steps": [s.spec() for s in self.steps]}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.steps!r})"


class Pipeline(_Composite):
    """Steps applied one after another; each sees the state the previous ones left."""
    name = "sequential"

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        return compose(self.steps, metas).groups

    def config_edits(self, metas: Mapping[str, TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """Each step's edits, made against the state and the config the steps before it leave; later ones win."""
        edits: dict[str, Any] = {}
        state, current = dict(metas), dict(config)
        for i, step in enumerate(self.steps):
            try:
                made = step.config_edits(state, current)
            except StatebridgeError as e:
                raise e.within(f"steps[{i}] ({step.name})") from None
            edits.update(made)
            current.update(made)
            if i + 1 < len(self.steps):
                # collisions were decided when the plan was built; here only the resulting state matters
                state = compose([step], state, on_collision="warn").metas
        return edits

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        states = [dict(metas)]
        for step in self.steps[:-1]:
            states.append(compose([step], states[-1]).metas)
        inverses = []
        for i in reversed(range(len(self.steps))):
            try:
                inverses.append(self.steps[i].inverse(states[i]))
            except StatebridgeError as e:
                raise e.within(f"steps[{i}] ({self.steps[i].name})") from None
        return Pipeline(inverses)


Sequential = Pipeline


class Parallel(_Composite):
    """Independent steps planned against the same state; they must read and write disjoint keys."""
    name = "parallel"

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        groups: list[Group] = []
        readers: dict[str, int] = {}
        writers: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            planned = compose([step], metas, where=f"parallel[{i}]").groups
            for group in planned:
                for key in group.inputs:
                    if key in readers:
                        raise PlanError(f"parallel steps [{readers[key]}] and [{i}] both read {key!r}; run them in sequence")
                    readers[key] = i
                for key in group.outputs:
                    if key in writers:
                        raise CollisionError(f"parallel steps [{writers[key]}] and [{i}] both write {key!r}")
                    writers[key] = i
            groups.extend(planned)
        return groups

    def config_edits(self, metas: Mapping[str, TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """Every step's edits, each made against the same state and config; two steps may not set one key differently."""
        edits: dict[str, Any] = {}
        by: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            try:
                made = step.config_edits(metas, config)
            except StatebridgeError as e:
                raise e.within(f"parallel[{i}] ({step.name})") from None
            for key, value in made.items():
                if key in edits and edits[key] != value:
                    raise PlanError(f"parallel steps [{by[key]}] and [{i}] both edit config.json's {key!r}, differently")
                edits[key], by[key] = value, i
        return edits

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        return Parallel([step.inverse(metas) for step in self.steps])


class Scope(_Composite):
    """Run steps on the keys under ``prefix`` as if the prefix were not there; other keys pass through."""
    name = "scope"

    class Params(_StepsParams):
        prefix: str

    def _inner(self, metas: Mapping[str, TensorMeta]) -> dict[str, TensorMeta]:
        n = len(self.params.prefix)
        inner = {k[n:]: m for k, m in metas.items() if k.startswith(self.params.prefix)}
        if not inner:
            raise PlanError(f"no key starts with prefix {self.params.prefix!r} (keys look like {describe_keys(list(metas)[:3])})")
        return inner

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        prefix = self.params.prefix
        return [_prefixed(g, prefix) for g in compose(self.steps, self._inner(metas), where="scope.steps").groups]

    def config_edits(self, metas: Mapping[str, TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """The steps' edits, made against the scope's tensors alone (the prefix removed), as in :meth:`plan`."""
        return Pipeline(self.steps).config_edits(self._inner(metas), config)

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
        pieces={prefix + k: tuple(replace(p, key=prefix + p.key) for p in v) for k, v in group.pieces.items()}
        if group.pieces
        else None,
        effort=group.effort,
    )
