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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

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

    @cached_property
    def affixes(self) -> tuple[str, str] | None:
        """(prefix, suffix) of a glob whose one wildcard is ``**``, which then matches exactly the keys
        that start with the prefix and end with the suffix, with at least one character between."""
        if self.is_regex or self.text.count("*") != 2 or "**" not in self.text:
            return None
        prefix, suffix = self.text.split("**")
        return prefix, suffix

    @property
    def is_regex(self) -> bool:
        return self.text.startswith(REGEX_PREFIX)

    @property
    def is_exact(self) -> bool:
        return not self.is_regex and "*" not in self.text

    def match(self, key: str) -> re.Match[str] | None:
        return self.regex.fullmatch(key)

    def expand(self, match: re.Match[str], target: str) -> str:
        """Fill ``target`` with this match's captures (``*`` in order for globs, ``\\1`` for regexes).

        The result must be a key a file can hold (see :func:`key_problem`).
        """
        if self.is_regex:
            try:
                key = match.expand(target)
            except (re.error, IndexError) as e:
                raise ConfigError(f"target {target!r} refers to a group that {self.text!r} does not have: {e}") from None
        else:
            literals, clean = template(target)
            captures = match.groups()
            if len(literals) != len(captures) + 1:
                raise ConfigError(
                    f"target {target!r} has {len(literals) - 1} wildcards but pattern {self.text!r} captures {len(captures)}"
                )
            key = literals[0]
            for capture, literal in zip(captures, literals[1:]):
                key += capture + literal
            if clean:  # captures are parts of a key, so they are fine too
                return key
        problem = key_problem(key)
        if problem:
            raise ConfigError(f"target {target!r} makes the key {key!r}, which {problem}")
        return key

    def select(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.match(k)]


@lru_cache(maxsize=256)
def template(target: str) -> tuple[tuple[str, ...], bool]:
    """A glob target's text between its wildcards (``a.*.b`` -> ``("a.", ".b")``), split once per target,
    and whether that text can be part of a key (see :func:`key_problem`)."""
    literals = tuple(re.split(r"\*\*|\*", target))
    return literals, not any(map(key_problem, literals))


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


def suggested_keys(
    suggest: Callable[..., Mapping[str, Sequence[str]] | None] | None, unmatched: Mapping[str, Any], candidates: Mapping[str, Any],
    shown: int = 5,
) -> str:
    """``; did you mean: 'a' -> 'b'; ...`` from the ``suggest_keys`` hook caller ``suggest`` (see :mod:`statebridge.hookspecs`)
    for keys made but not wanted (``unmatched``) and wanted but not made (``candidates``), or ``""`` when no plugin suggests any.

    A plugin's failure here must not hide the error the suggestions decorate: it is turned into no suggestion.
    """
    if suggest is None or not unmatched or not candidates:
        return ""
    try:
        found = suggest(unmatched=unmatched, candidates=candidates) or {}
        pairs = [(k, [str(c) for c in found[k]][:3]) for k in unmatched if found.get(k)]
    except Exception:  # noqa: BLE001 - a suggestion is a courtesy; the error it would decorate is what matters
        return ""
    if not pairs:
        return ""
    text = "; ".join(f"{k!r} -> {' or '.join(map(repr, near))}" for k, near in pairs[:shown])
    more = f" (and {len(pairs) - shown} more)" if len(pairs) > shown else ""
    return f"; did you mean: {text}{more}?"


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot name a tensor in a file, or None when it can.

    Every format stores names as UTF-8 text (safetensors' JSON header, GGUF, the
    pickle of a state dict), but a Python string, and a JSON ``\\ud800`` escape,
    can hold a lone surrogate, which is no character and has no UTF-8 form: such a
    name could be neither written nor printed.  Any other character, control
    characters and NUL included, is stored as it is (and escaped when shown).
    """
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not a string"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds {key[e.start]!r}, a lone surrogate, which is not a character (no file can store it as UTF-8)"
    return None


def shown(key: str) -> str:
    """``key`` as it can be printed: characters that are not printable (controls, NUL, surrogates) escaped.

    For display only: a key holding an escape sequence must not repaint the terminal
    it is listed on, nor one holding a surrogate stop the listing.
    """
    if key.isprintable():
        return key
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in key)


#: a dotted component that is a layer number: a plain decimal of at most 18 digits (so it fits an
#: int64 and converts without Python's limit on long integer strings); "007" is a name, not a number
NUMBER = re.compile(r"(?<![^.])(?:0|[1-9]\d{0,17})(?![^.])")


def family(key: str) -> tuple[str, ...]:
    """What ``key`` is, its layer numbers left out: keys of one family differ only in those numbers."""
    return tuple(NUMBER.split(key))


def compress_keys(keys: Sequence[str]) -> list[str]:
    """Fold numbered components into ranges: ``layers.{0..31}.mlp.up.weight``.

    Keys that differ only in dotted numeric components are merged; the result keeps
    first-seen order and shows unprintable characters escaped (see :func:`shown`).
    Used by ``inspect`` and by error messages that list keys.
    """
    families: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for key in keys:
        families.setdefault(family(key), []).append(tuple(int(m) for m in NUMBER.findall(key)))
    out = []
    for pieces, numbers in families.items():
        columns = [number_range(sorted(set(column))) for column in zip(*numbers)]
        text = pieces[0] + "".join(number + piece for number, piece in zip(columns, pieces[1:]))
        out.append(shown(text))
    return out


def number_range(values: Sequence[int]) -> str:
    """Sorted layer numbers as a fold shows them: ``3``, ``{0..31}`` or ``{0,2,5}``."""
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
