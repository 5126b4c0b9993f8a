"""Finding the ``statebridge`` entry points of installed distributions, quickly.

``importlib.metadata`` answers the same question, but importing it parses
e-mail headers and zip files and costs about as much as the rest of
``statebridge --help``; start-up is a promise (under 0.15 s), so this module
reads the same files directly: every ``*.dist-info`` (or ``*.egg-info``)
folder on ``sys.path`` with an ``entry_points.txt`` naming the group.  Only the
first distribution of a name on ``sys.path`` counts, as for imports.
``tests/test_plugins.py`` checks that it finds exactly what
``importlib.metadata`` finds.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any


@dataclass
class EntryPoint:
    """One ``name = module[:attribute]`` line of a distribution's ``entry_points.txt``."""

    name: str
    value: str
    metadata_dir: Path

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        loaded = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            loaded = getattr(loaded, part)
        return loaded

    @cached_property
    def _headers(self) -> dict[str, str]:
        """``Name`` and ``Version`` from the distribution's METADATA (PKG-INFO for egg-info)."""
        headers: dict[str, str] = {}
        for filename in ("METADATA", "PKG-INFO"):
            try:
                with open(self.metadata_dir / filename, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if not line.strip():
                            break  # the headers end at the first blank line
                        key, sep, value = line.partition(":")
                        if sep and key in ("Name", "Version"):
                            headers.setdefault(key, value.strip())
            except OSError:
                continue
            break
        return headers

    @property
    def distribution(self) -> str:
        return self._headers.get("Name") or _folder_name(self.metadata_dir.name)[0]

    @property
    def version(self) -> str:
        return self._headers.get("Version") or _folder_name(self.metadata_dir.name)[1]


def _folder_name(folder: str) -> tuple[str, str]:
    """``statebridge_lora-0.1.0.dist-info`` -> ("statebridge_lora", "0.1.0")."""
    stem = folder.rsplit(".", 1)[0]
    name, _, version = stem.partition("-")
    return name, version.split("-")[0] or "?"


def _normalized(name: str) -> str:
    return name.replace("-", "_").replace(".", "_").lower()


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of ``group`` in the distributions importable from ``sys.path``."""
    found: list[EntryPoint] = []
    seen: set[str] = set()
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for folder in names:
            if not folder.endswith((".dist-info", ".egg-info")):
                continue
            distribution = _normalized(_folder_name(folder)[0])
            if distribution in seen:
                continue
            seen.add(distribution)
            metadata_dir = Path(entry or ".") / folder
            try:
                text = (metadata_dir / "entry_points.txt").read_text(encoding="utf-8")
            except OSError:
                continue
            found.extend(EntryPoint(name, value, metadata_dir) for name, value in _section(text, group))
    return found


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """The ``name = value`` lines of ``[group]`` in an INI-style ``entry_points.txt``."""
    lines, inside = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
        elif inside and "=" in line:
            name, _, value = line.partition("=")
            lines.append((name.strip(), value.strip()))
    return lines
