"""Name-only transforms: rename, identity, drop. They never change a tensor's bytes."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from pydantic import model_validator

from ..errors import PlanError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import KeyPattern, template
from .base import Group, Params, Transform
from .matching import nothing_matches, require, select

if TYPE_CHECKING:
    from torch import nn


class Rename(Transform):
    """Rename keys: an exact ``mapping``, or a ``pattern`` and its target ``to``.

    Glob patterns match whole keys (``model.layers.*.attn.**`` -> ``layers.*.attention.**``);
    ``re:`` patterns substitute every match inside the key, like ``re.sub``
    (``re:^bert\\.`` -> ``""``).  Keys the rename does not match pass through.
    """
    name = "rename"

    class Params(Params):
        mapping: dict[str, str] | None = None
        pattern: str | None = None
        to: str | None = None
        strict: bool = True  # a mapping key or pattern that matches nothing is an error

        @model_validator(mode="after")
        def _one_form(self) -> "Rename.Params":
            if (self.mapping is None) == (self.pattern is None):
                raise ValueError("give either 'mapping' or 'pattern' with 'to'")
            if self.pattern is not None and self.to is None:
                raise ValueError("'pattern' needs 'to'")
            if self.pattern is not None:
                KeyPattern(self.pattern).regex  # compile now: a regex typo is a config error
            return self

    def pairs(self, metas: Mapping[str, TensorMeta]) -> list[tuple[str, str]]:
        p = self.params
        if p.mapping is not None:
            present = [k for k in p.mapping if k in metas]
            if p.strict:
                require(list(p.mapping), metas, "named in the rename mapping")
            return [(k, p.mapping[k]) for k in present]
        compiled = KeyPattern(p.pattern)
        if compiled.is_regex:
            regex = compiled.regex
            pairs = []
            for key in metas:
                if regex.search(key):
                    try:
                        pairs.append((key, regex.sub(p.to, key)))
                    except (re.error, IndexError) as e:
                        raise PlanError(f"target {p.to!r} does not fit pattern {p.pattern!r}: {e}") from None
            if not pairs and p.strict:
                raise nothing_matches(p.pattern, metas)
            return pairs
        return list(self._globbed(compiled, metas))

    def _globbed(self, compiled: KeyPattern, metas: Mapping[str, TensorMeta]) -> Iterator[tuple[str, str]]:
        """(key, new key) for a glob ``pattern``, in one pass over the keys (plans of 200,000 keys)."""
        p = self.params
        if compiled.is_exact:
            yield from ((k, compiled.expand(compiled.match(k), p.to)) for k in select(p.pattern, metas, p.strict))  # type: ignore[arg-type]
            return
        found = False
        affixes = compiled.affixes
        literals, clean = template(p.to)
        if affixes is not None and clean and len(literals) == 2:
            # one ``**`` between a prefix and a suffix, one wildcard in the target (``model.**`` ->
            # ``**``): a match is a key with both affixes and something between them, and its new
            # name that middle between the target's literals.  No regex: plans of 200,000 keys.
            (prefix, suffix), (before, after) = affixes, literals
            start, tail, shortest = len(prefix), len(suffix), len(prefix) + len(suffix)
            for key in metas:
                if key.startswith(prefix) and key.endswith(suffix) and len(key) > shortest:
                    found = True
                    yield key, before + key[start : len(key) - tail] + after
        else:
            match, expand, to = compiled.regex.fullmatch, compiled.expand, p.to
            for key in metas:
                m = match(key)
                if m:
                    found = True
                    yield key, expand(m, to)  # type: ignore[arg-type]
        if not found and p.strict:
            raise nothing_matches(p.pattern, metas)  # type: ignore[arg-type]

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        p = self.params
        if p.pattern is not None and not KeyPattern(p.pattern).is_regex:  # no list of pairs held beside the groups
            return [Group.rename(src, dst, metas[src]) for src, dst in self._globbed(KeyPattern(p.pattern), metas) if src != dst]
        return [Group.rename(src, dst, metas[src]) for src, dst in self.pairs(metas) if src != dst]

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        return Rename(mapping={dst: src for src, dst in self.pairs(metas) if src != dst}, strict=True)


class Identity(Transform):
    """Mark keys as deliberately carried over unchanged (they count as mapped, not unmapped)."""
    name = "identity"

    class Params(Params):
        keys: list[str]
        strict: bool = True  # every exact key must exist and every pattern must match

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        keys = dict.fromkeys(k for pattern in self.params.keys for k in select(pattern, metas, self.params.strict))
        return [Group.rename(k, k, metas[k]) for k in keys]

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        return self


def identity_from_module(module: nn.Module) -> Identity:
    """An :class:`Identity` over exactly the module's parameter and buffer names."""
    return Identity(keys=list(module.state_dict(keep_vars=True)))


class Drop(Transform):
    """Remove keys on purpose. Nothing is ever dropped without a drop step; every dropped key is reported."""
    name = "drop"

    class Params(Params):
        keys: list[str]
        strict: bool = True

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        keys = dict.fromkeys(k for pattern in self.params.keys for k in select(pattern, metas, self.params.strict))
        return [Group(inputs=(k,), outputs={}, compute=lambda t: {}, ops=("drop",)) for k in keys]


__all__ = ["Drop", "Identity", "Rename", "identity_from_module"]
