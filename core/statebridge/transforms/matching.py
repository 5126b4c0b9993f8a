"""Finding the keys a step applies to, and binding multi-key groups by their captures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import PlanError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import KeyPattern, did_you_mean


def select(pattern: str, metas: Mapping[str, TensorMeta], strict: bool = True) -> list[str]:
    """Keys matching ``pattern``, in state order; with ``strict``, matching none is an error."""
    compiled = KeyPattern(pattern)
    if compiled.is_exact:
        if pattern in metas:
            return [pattern]
        if strict:
            raise PlanError(f"source key {pattern!r} is not in the state{did_you_mean(pattern, metas)}")
        return []
    keys = compiled.select(metas)
    if not keys and strict:
        raise PlanError(f"pattern {pattern!r} matches no key (set strict: false to allow that)")
    return keys


def bind(
    anchor: str, others: Sequence[str], metas: Mapping[str, TensorMeta], strict: bool = True
) -> list[tuple[str, list[str]]]:
    """For each key matching ``anchor``, fill each pattern of ``others`` with its captures.

    ``bind("l.*.q", ["l.*.k", "l.*.qk"], ...)`` gives ``[("l.0.q", ["l.0.k", "l.0.qk"]), ...]``.
    """
    compiled = KeyPattern(anchor)
    out = []
    for key in select(anchor, metas, strict):
        match = compiled.match(key)
        assert match is not None
        out.append((key, [compiled.expand(match, other) for other in others]))
    return out


def require(keys: Sequence[str], metas: Mapping[str, TensorMeta], why: str) -> None:
    """Every key must exist in the state, else one error naming the first missing one."""
    for key in keys:
        if key not in metas:
            raise PlanError(f"source key {key!r} ({why}) is not in the state{did_you_mean(key, metas)}")
