"""Version chains: named checkpoint layouts and the rules between them.

A config may name versions (``v1``, ``v2``, ...) and give rule sets that convert
one into another.  ``statebridge run --from v1 --to v3`` finds the shortest
chain of rules in that directed graph and composes it into one pipeline, so the
data is read once, not once per hop.  ``--from`` may be left out: the source's
version is then recognised by its key signature (patterns every checkpoint of
that version has, and patterns it must not have)::

    versions:
      v1: {signature: ["bert.encoder.layer.*.attention.self.query.weight"]}
      v2: {signature: ["encoder.layers.*.attn.q.weight"], absent: ["bert.**"]}
      v3: {}
    rules:
      - {from: v1, to: v2, steps: [...]}
      - {from: v2, to: v3, steps: [...]}
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, PlanError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import KeyPattern
from ..transforms.composite import Pipeline, build_steps


class Version(BaseModel):
    """A named layout, recognisable by its keys."""

    model_config = ConfigDict(extra="forbid")

    signature: list[str] = Field(default_factory=list, description="patterns that each match some key of this version")
    absent: list[str] = Field(default_factory=list, description="patterns that match no key of this version")

    def matches(self, keys: Sequence[str]) -> bool:
        if not self.signature:
            return False
        present = all(KeyPattern(p).select(keys) for p in self.signature)
        return present and not any(KeyPattern(p).select(keys) for p in self.absent)


class Rule(BaseModel):
    """The steps that turn version ``from`` into version ``to``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: str = Field(alias="from")
    target: str = Field(alias="to")
    steps: list[dict[str, Any]]


class VersionGraph:
    """Versions and the rules between them; finds and composes the shortest chain."""

    def __init__(self, versions: Mapping[str, Version], rules: Sequence[Rule]) -> None:
        self.versions = dict(versions)
        self.rules = list(rules)
        for i, rule in enumerate(self.rules):
            for name in (rule.source, rule.target):
                if self.versions and name not in self.versions:
                    raise ConfigError(f"rules[{i}]: version {name!r} is not declared under versions: ({', '.join(self.versions)})")

    def chain(self, start: str, goal: str) -> list[Rule]:
        """The shortest sequence of rules from ``start`` to ``goal`` (first declared wins ties)."""
        known = set(self.versions) | {r.source for r in self.rules} | {r.target for r in self.rules}
        for name in (start, goal):
            if name not in known:
                raise ConfigError(f"unknown version {name!r}; known versions: {', '.join(sorted(known))}")
        if start == goal:
            return []
        previous: dict[str, Rule] = {}
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for rule in self.rules:
                if rule.source == here and rule.target not in previous and rule.target != start:
                    previous[rule.target] = rule
                    if rule.target == goal:
                        path = [rule]
                        while path[0].source != start:
                            path.insert(0, previous[path[0].source])
                        return path
                    queue.append(rule.target)
        reachable = sorted(previous) or ["nothing"]
        edges = ", ".join(f"{r.source}->{r.target}" for r in self.rules) or "none"
        raise PlanError(
            f"no chain of rules from {start!r} to {goal!r}: from {start!r} the rules reach {', '.join(reachable)}; "
            f"add a rule into {goal!r} (rules: {edges})"
        )

    def detect(self, metas: Mapping[str, TensorMeta]) -> str:
        """The one version whose signature the source's keys fit."""
        keys = list(metas)
        found = [name for name, version in self.versions.items() if version.matches(keys)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise PlanError(
                "the source matches no version's signature; name it with --from "
                f"({', '.join(self.versions)})"
            )
        raise PlanError(f"the source matches the signatures of {', '.join(found)}; name one with --from")

    def pipeline(self, start: str, goal: str, transforms: Any = None) -> Pipeline:
        """The chain from ``start`` to ``goal`` as one pipeline (one pass over the data)."""
        return Pipeline(
            [Pipeline(build_steps(rule.steps, transforms, where=f"rule {rule.source}->{rule.target}: steps")) for rule in self.chain(start, goal)]
        )
