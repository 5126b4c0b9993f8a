"""statebridge's own metadata keys in outputs: provenance, reserved, and how a caller's metadata is checked.

Every key under ``statebridge.`` in an output's metadata is statebridge's own:
a run writes its provenance there (:mod:`statebridge.planning.fingerprint`), a
caller's ``metadata`` may not set any of them, and the ones a source carries
(from an earlier run) are replaced, never copied.  Writers, readers and reports
all need these names, so they live here, below all of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..errors import ConfigError
from .patterns import key_problem

#: metadata keys starting with this belong to statebridge (see :func:`is_reserved`)
RESERVED_PREFIX = "statebridge."
FINGERPRINT_KEY = "statebridge.fingerprint"
LINEAGE_KEY = "statebridge.lineage"
VERSION_KEY = "statebridge.version"
#: the companion files (config.json, tokenizer, ...) a run wrote beside the weights of a folder target
COMPANIONS_KEY = "statebridge.companions"


def is_reserved(key: str) -> bool:
    """Whether a metadata key is statebridge's own (``statebridge.*``): only a run's provenance sets it."""
    return key.startswith(RESERVED_PREFIX)


#: a metadata value a caller may give: text (every format), a number, boolean or list of one kind (GGUF
#: fields), or None, which deletes a field the output would carry from the source
MetadataValue = str | bool | int | float | list | None


def user_metadata(metadata: Mapping[str, object] | None) -> dict[str, MetadataValue]:
    """A caller's ``metadata`` for the output, checked: text keys, none of them statebridge's own, and plain values.

    A value is text (what every format stores), a number, a boolean or a non-empty list
    of one of them (typed GGUF fields; a text format refuses them when the target is
    known, see :mod:`statebridge.writers.metadata`), or None, which deletes a field the
    source carries.  Nothing is converted: ``{"a": 1}`` stays a number, never ``"1"``.
    A reserved key is refused because it would forge the run's provenance.
    """
    checked: dict[str, MetadataValue] = {}
    for key, value in (metadata or {}).items():
        problem = key_problem(key)
        if problem:
            raise ConfigError(f"metadata key {key!r} {problem}")
        if is_reserved(key):
            raise ConfigError(
                f"metadata key {key!r} is reserved: statebridge writes {RESERVED_PREFIX}* itself "
                "(version, fingerprint, lineage); choose another name"
            )
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"metadata {key!r}: the value is an empty list, which no format can store")
            for item in value:
                _check_value(key, item, "an item")
        elif value is not None:
            _check_value(key, value, "the value")
        checked[key] = value
    return checked


def _check_value(key: str, value: object, what: str) -> None:
    if isinstance(value, str):
        problem = key_problem(value)
        if problem:
            raise ConfigError(f"metadata {key!r}: {what} {problem}")
    elif not isinstance(value, bool | int | float):
        raise ConfigError(
            f"metadata {key!r}: {what} {value!r} is a {type(value).__name__}; a value is text, a number, a boolean, "
            "a list of one of them, or null to delete the field"
        )


def read_lineage(text: str | None) -> tuple[dict[str, dict[str, list[str]]], str | None]:
    """The lineage a file's ``statebridge.lineage`` records, and why it was ignored (None when it was not).

    A file from another tool may hold anything under that key: what is not the JSON
    :func:`~statebridge.planning.fingerprint.lineage_json` writes (key -> ``{"from": [...], "ops": [...]}``) is ignored, with a reason.
    """
    if not text:
        return {}, None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        return {}, f"it is not JSON ({type(e).__name__})"
    if not isinstance(data, dict):
        return {}, f"it is a JSON {type(data).__name__}, not an object"
    for key, entry in data.items():
        parts = [entry.get(part) if isinstance(entry, dict) else None for part in ("from", "ops")]
        names = [key, *(name for part in parts if isinstance(part, list) for name in part)]
        if not all(isinstance(part, list) for part in parts) or any(key_problem(name) for name in names):
            return {}, f"its entry for {key[:100]!r} is not {{\"from\": [names], \"ops\": [names]}} of text"
    return data, None


def read_companions(text: object) -> list[str]:
    """The file names a ``statebridge.companions`` entry lists (none when it is absent or not ours)."""
    try:
        names = json.loads(text) if isinstance(text, str) else []
    except (ValueError, RecursionError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
