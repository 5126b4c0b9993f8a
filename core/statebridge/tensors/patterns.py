"""Key patterns: globs and regexes that match tensor names, and compact display of key lists.

Glob syntax (used by every transform that takes a ``pattern``):

- ``*`` matches one name component or part of one (no dots), e.g. ``layers.*.q_proj.weight``;
- ``**`` matches anything, dots included;
- every wildcard is a capture: ``*`` in a target pattern is replaced by the captures in order.

A pattern with no wildcard matches exactly one key.  ``re:`` before a pattern
makes it a Python regular expression whose groups are referenced in targets as
``\\1`` or ``\\g<name>``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from ..errors import ConfigError

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class KeyPattern:
    """A compiled glob or regex over tensor names."""

    text: str

    @cached_property
    def regex(self) -> re.Pattern[str]:
        if self.text.startswith(REGEX_PREFIX):
            source = self.text[len(REGEX_PREFIX) :]
            try:
                return re.compile(source)
            except re.error as e:
                raise ConfigError(
                    f"pattern '{self.text}' is not a valid regular expression: {e.msg} at position {e.pos}"
                ) from None
        parts = re.split(r"(\*\*|\*)", self.text)
        out = []
        for part in parts:
            if part == "**":
                out.append("(.+?)")
            elif part == "*":
                out.append("([^.]+?)")
            else:
                out.append(re.escape(part))
        return re.compile("".join(out))

    @property
    def is_regex(self) -> bool:
        return self.text.startswith(REGEX_PREFIX)

    @property
    def is_exact(self) -> bool:
        return not self.is_regex and "*" not in self.text

    def match(self, key: str) -> re.Match[str] | None:
        return self.regex.fullmatch(key)

    def expand(self, match: re.Match[str], target: str) -> str:
        """Fill ``target`` with this match's captures (``*`` in order for globs, ``\\1`` for regexes)."""
        if self.is_regex:
            try:
                return match.expand(target)
            except (re.error, IndexError) as e:
                raise ConfigError(f"target {target!r} refers to a group that {self.text!r} does not have: {e}") from None
        captures = iter(match.groups())
        pieces = re.split(r"(\*\*|\*)", target)
        wildcards = sum(1 for p in pieces if p in ("*", "**"))
        if wildcards != len(match.groups()):
            raise ConfigError(
                f"target {target!r} has {wildcards} wildcards but pattern {self.text!r} captures {len(match.groups())}"
            )
        return "".join(next(captures) if p in ("*", "**") else p for p in pieces)

    def select(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.match(k)]


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates most like ``name`` (at most ``n``, about equally close), best first."""
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in set(candidates)), key=lambda s: (-s[0], s[1])
    )
    if not scored or scored[0][0] < 0.7:
        return []
    best = scored[0][0]
    return [c for ratio, c in scored[:n] if ratio >= best - 0.02]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    hints = closest(name, candidates)
    return f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""


NUMBER = re.compile(r"(?<![^.])\d+(?![^.])")


def compress_keys(keys: Sequence[str]) -> list[str]:
    """Fold numbered components into ranges: ``layers.{0..31}.mlp.up.weight``.

    Keys that differ only in one dotted numeric component are merged; the result
    keeps first-seen order.  Used by ``inspect`` and by error messages that list keys.
    """
    families: dict[str, list[tuple[int, ...]]] = {}
    for key in keys:
        numbers = tuple(int(m) for m in NUMBER.findall(key))
        shape = NUMBER.sub("#", key)
        families.setdefault(shape, []).append(numbers)
    out = []
    for shape, numbers in families.items():
        if len(numbers) == 1:
            out.append(_fill(shape, [str(n) for n in numbers[0]]))
            continue
        columns = list(zip(*numbers))
        out.append(_fill(shape, [_span(sorted(set(col))) for col in columns]))
    return out


def _fill(shape: str, parts: Sequence[str]) -> str:
    it = iter(parts)
    return re.sub("#", lambda _: next(it), shape)


def _span(values: Sequence[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def describe_keys(keys: Sequence[str], limit: int = 8) -> str:
    """A short, readable list of keys for messages."""
    folded = compress_keys(keys)
    shown = ", ".join(folded[:limit])
    return shown + (f", ... ({len(folded) - limit} more patterns)" if len(folded) > limit else "")
