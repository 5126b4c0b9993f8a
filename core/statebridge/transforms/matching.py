"""Finding the keys a step applies to, and binding multi-key groups by their captures."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..errors import PlanError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import NUMBER, REGEX_PREFIX, KeyPattern, describe_keys, did_you_mean

#: below this many keys, a pattern's hint also considers every key itself, not only the keys' shapes
_HINT_ALL_KEYS = 5000


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
        raise nothing_matches(pattern, metas)
    return keys


def nothing_matches(pattern: str, metas: Mapping[str, TensorMeta]) -> PlanError:
    """The error for a strict pattern that matches no key, with a hint at what it may have meant.

    A glob is compared with the keys' shapes (numbers folded to ``*``: ``model.layers.*.mlp.weight``)
    and, for small states, the keys themselves; a ``*`` that would match as ``**`` is pointed out.
    Failing those, the message shows what the keys look like.
    """
    hint = ""
    if not KeyPattern(pattern).is_regex:
        widened = re.sub(r"(?<!\*)\*(?!\*)", "**", pattern)
        if widened != pattern and KeyPattern(widened).select(metas):
            hint = f"; '*' matches within one name component: did you mean {widened!r}?"
        else:
            shapes = {NUMBER.sub("*", k) for k in metas}
            hint = did_you_mean(pattern, shapes | set(metas) if len(metas) <= _HINT_ALL_KEYS else shapes)
    if not hint:
        hint = f"; keys look like {describe_keys(list(metas)[:3])}" if metas else "; the state has no keys"
    return PlanError(f"pattern {pattern!r} matches no key{hint} (set strict: false to allow that)")


def exact_pattern(key: str) -> str:
    """A pattern matching ``key`` alone (a ``re:`` one where the key holds ``*`` or starts with ``re:``)."""
    return key if KeyPattern(key).is_exact else REGEX_PREFIX + re.escape(key)


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


def distinct(names: Sequence[str], what: str) -> None:
    """Refuse one group naming a key twice among ``what`` (its inputs, or its outputs).

    Outputs are a mapping, so a name given twice would silently keep one part
    of the result (half a split tensor); inputs given twice would read a tensor twice.
    """
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PlanError(f"{what} name {name!r} twice; each needs a key of its own")
        seen.add(name)


def require(keys: Sequence[str], metas: Mapping[str, TensorMeta], why: str) -> None:
    """Every key must exist in the state, else one error naming the first missing one."""
    for key in keys:
        if key not in metas:
            raise PlanError(f"source key {key!r} ({why}) is not in the state{did_you_mean(key, metas)}")
