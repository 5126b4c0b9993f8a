"""The target policy: what a run may write over, decided before any byte is written.

A run replaces its target as a whole (see :mod:`statebridge.execute.transaction`), so before it
writes anything, dry runs included, it checks:

1. **The source is safe.**  The target must not contain the source, nor lie inside a source
   folder (symlinks resolved): replacing it would delete the input, and writing inside it
   would change what the source folder holds.  A target that *is* the source (an in-place
   conversion) needs ``overwrite``; the new version then replaces the input only once it is
   complete and the source files were checked to be unchanged.
2. **Only statebridge's own output is replaced.**  An existing target is replaced when it is
   empty (a folder with no files, a file of no bytes) or statebridge wrote it, which is told
   from the provenance statebridge stores in what it writes: ``statebridge.fingerprint``
   in a safetensors file's ``__metadata__``, among a GGUF file's key-values, or in a shard
   index's ``metadata``.  A file target must carry it; a folder target must hold nothing
   but files that carry it (its shards and index): one other file, a ``notes.txt`` or a
   ``config.json``, makes it a folder statebridge did not write.  Torch pickles have no
   room for provenance, so an existing ``.pt`` is never recognised.  Anything else (a
   folder of other files, a file from elsewhere, a symlink, a FIFO) is replaced only with
   ``overwrite`` (``--overwrite``, ``overwrite: true``), and then too only through the
   atomic swap.
3. **No other run is writing it** (see :func:`statebridge.execute.transaction.refuse_if_busy`).

Only headers are read, and torch is never imported.  Refusals are
:class:`~statebridge.errors.ConfigError` lines naming the target and what is in the way;
the dry run prints the :class:`Verdict`, and a run that replaces something says so.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StatebridgeError
from ..tensors.provenance import COMPANIONS_KEY, FINGERPRINT_KEY, read_companions
from ..readers.base import Source
from .transaction import refuse_if_busy

_OVERWRITE = "pass --overwrite (overwrite: true in a config, overwrite=True in Python) to replace it"


@dataclass(frozen=True)
class Verdict:
    """What a run will do to its target."""

    target: Path
    existing: str | None = None  # what is there now, when the run replaces something
    overwrite: bool = False  # replacing it needed ``overwrite``

    def __str__(self) -> str:
        if self.existing is None:
            return f"{self.target} (new)"
        why = ", as --overwrite allows" if self.overwrite else ""
        return f"{self.target} exists ({self.existing}); the run replaces it{why}"


@dataclass
class TargetPolicy:
    """The checks above for one run; :meth:`check` raises or returns the :class:`Verdict`."""

    target: Path
    folder: bool  # the new version is a folder
    source: Source
    named: object = None  # the source as the caller named it (a path, usually)
    overwrite: bool = False
    verdict: Verdict | None = field(default=None, init=False)

    def check(self, own: Path | None = None) -> Verdict:
        """Decide from what is on disk now; ``own`` is this run's staging path, once it exists."""
        target = Path(self.target).absolute()
        is_source = self._check_placement(target)
        refuse_if_busy(target, own=own)
        existing = _describe(target)
        if existing is None:
            self.verdict = Verdict(target)
        elif is_source:
            if not self.overwrite:
                raise ConfigError(f"target {target} is the source; write the result elsewhere, or {_OVERWRITE} with the result")
            self.verdict = Verdict(target, f"the source, {existing.what}", overwrite=True)
        elif existing.ours:
            self.verdict = Verdict(target, existing.what)
        elif self.overwrite:
            self.verdict = Verdict(target, existing.what, overwrite=True)
        else:
            raise ConfigError(f"target {target} is {existing.what}; refusing to replace it: choose another target, or {_OVERWRITE}")
        return self.verdict

    def _check_placement(self, target: Path) -> bool:
        """Refuse a target that contains the source or lies inside a source folder; True if it is the source."""
        resolved = Path(os.path.realpath(target))
        paths = _source_paths(self.source, self.named)
        if resolved in paths:
            return True
        for path in paths:
            if path.is_relative_to(resolved):
                raise ConfigError(
                    f"target {target} contains the source {path}; replacing it would delete the input: "
                    "choose a target outside it"
                )
            if path.is_dir() and resolved.is_relative_to(path):
                raise ConfigError(
                    f"target {target} lies inside the source folder {path}; writing there would change the "
                    "input: choose a target outside it"
                )
        return False


@dataclass(frozen=True)
class _Existing:
    what: str  # for messages: "a folder statebridge wrote, 3 files"
    ours: bool  # empty, or written by statebridge


def _describe(target: Path) -> _Existing | None:
    """What is at ``target`` now, and whether statebridge may replace it without ``overwrite``."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"target {target}: cannot look at it: {e.strerror or e}") from None
    if stat.S_ISLNK(info.st_mode):
        return _Existing(f"a symbolic link (to {os.readlink(target)})", False)
    if stat.S_ISDIR(info.st_mode):
        return _describe_folder(target)
    if not stat.S_ISREG(info.st_mode):
        return _Existing("neither a regular file nor a folder", False)
    if info.st_size == 0:
        return _Existing("an empty file", True)
    if _has_provenance(target):
        return _Existing("a file statebridge wrote", True)
    why = " (torch files carry no provenance to tell)" if _is_torch(target) else ""
    return _Existing(f"a file statebridge did not write{why}", False)


def _describe_folder(folder: Path) -> _Existing:
    """Whether every file in ``folder`` is statebridge's: weights and indexes carrying provenance, or
    the companion files (config.json, tokenizer, ...) that provenance lists; stops at the second foreign one."""
    count, foreign, companions = 0, [], set()
    try:
        for name in _entries(folder):
            count += 1
            path = folder / name
            metadata = None if path.is_symlink() or not path.is_file() else _provenance(path)
            if metadata is None:
                foreign.append(name)
            else:
                companions.update(read_companions(metadata.get(COMPANIONS_KEY)))
    except OSError as e:
        raise ConfigError(f"target {folder}: cannot list it: {e.strerror or e}") from None
    foreign = [name for name in foreign if name not in companions]
    if foreign:
        others = " and other files" if len(foreign) > 1 else ""
        return _Existing(f"a folder holding {foreign[0]!r}{others}, which statebridge did not write", False)
    if not count:
        return _Existing("a folder with no files", True)
    return _Existing(f"a folder statebridge wrote, {count} file{'s' if count != 1 else ''}", True)


def _entries(folder: Path) -> Iterator[str]:
    """Every non-folder entry under ``folder`` (files, links, ...) as a relative path, in sorted order per folder."""
    for root, dirs, files in os.walk(folder, onerror=_raise):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            yield os.path.relpath(os.path.join(root, name), folder)


def _raise(error: OSError) -> None:
    raise error


def _has_provenance(path: Path) -> bool:
    """Whether a safetensors file, GGUF file or shard index carries statebridge's fingerprint (headers only)."""
    return _provenance(path) is not None


def _provenance(path: Path) -> Mapping[str, Any] | None:
    """The metadata of a safetensors file, GGUF file or shard index that carries statebridge's fingerprint, else None."""
    from ..readers import sniff
    from ..readers.gguf import GGUFSource
    from ..readers.safetensors import SafetensorsFile

    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text(encoding="utf-8"))
            metadata = index.get("metadata") if isinstance(index, dict) else None
            return metadata if isinstance(metadata, dict) and FINGERPRINT_KEY in metadata else None
        with open(path, "rb") as f:
            kind = sniff(f.read(9))
        if kind == "torch" or _is_torch(path):
            return None  # torch pickles: no room for provenance, and reading them would import torch
        reader: Source = GGUFSource(path) if kind == "gguf" else SafetensorsFile(path)
        with reader:
            return dict(reader.metadata) if FINGERPRINT_KEY in reader.metadata else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, StatebridgeError):
        return None


def _is_torch(path: Path) -> bool:
    from ..readers.base import TORCH_SUFFIXES

    return path.suffix.lower() in TORCH_SUFFIXES


def _source_paths(source: Source, named: object) -> list[Path]:
    """The source's files and the folder or file it was named by, symlinks resolved."""
    paths = [*source.files()]
    for candidate in (named, source.name):
        if isinstance(candidate, (str, os.PathLike)) and os.path.lexists(candidate):
            paths.append(Path(candidate))
    return list(dict.fromkeys(Path(os.path.realpath(p)) for p in paths))
