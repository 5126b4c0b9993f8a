"""Model folders: the files beside the weights (config, tokenizer, ...) and the edits a plan makes to config.json.

A Hugging Face model folder holds more than tensors: ``config.json``,
``generation_config.json``, the tokenizer, chat templates, a README.  A run
from such a folder into a folder target writes these *companion* files into
the same staging folder as the tensors, so they are committed with them in one
atomic step.  ``config.json`` is written with the edits the pipeline's steps
declare (:meth:`statebridge.Transform.config_edits`: a cast sets ``dtype``,
a depth change ``num_hidden_layers``); every other companion is copied byte for
byte.  A PEFT adapter folder (``adapter_config.json``) is the same, and its
weights keep PEFT's file name, ``adapter_model.safetensors``.

Everything here works from headers and small JSON files: no tensor is read and
torch is never imported.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from ..readers.safetensors import INDEX_NAME, ShardedSafetensors
from ..writers.base import PlannedFile

if TYPE_CHECKING:
    from ..readers import SourceLike
    from ..readers.base import Source
    from ..transforms.base import Transform
    from ..writers.base import Writer

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
#: the weights' file stem in a PEFT adapter folder (``adapter_model.safetensors``), as PEFT loads it
ADAPTER_STEM = "adapter_model"
#: suffixes of weight files: never carried, because the run writes the weights (a stale copy would mislead)
WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".tflite", ".ot"}
)


@dataclass(frozen=True)
class Companion:
    """A file of the source folder that a folder target gets too."""

    name: str
    path: Path
    size: int


@dataclass
class ModelFolder:
    """A source model folder as a plan sees it: its companion files and the edits to its ``config.json``."""

    path: Path
    companions: list[Companion]  # in name order
    left: dict[str, str]  # entries of the folder that are not carried -> why
    config: dict[str, Any] | None  # config.json as read, or None when there is none
    edits: dict[str, Any] = field(default_factory=dict)  # top-level key of config.json -> its new value
    adapter: bool = False  # a PEFT adapter folder (adapter_config.json)
    #: whether the target gets the companions (a folder target); None until a writer is known
    carried: bool | None = None

    @property
    def stem(self) -> str | None:
        """The file stem the target's weights must keep to load (PEFT's ``adapter_model``), or None for the writer's own."""
        return ADAPTER_STEM if self.adapter else None

    def edited_config(self) -> dict[str, Any]:
        """config.json with the edits applied: same key order, edited values in place, new keys at the end."""
        return {**(self.config or {}), **self.edits}

    def config_text(self) -> str:
        """The text of the edited config.json, indented as ``transformers`` writes it."""
        return json.dumps(self.edited_config(), indent=2) + "\n"

    def changes(self) -> list[tuple[str, Any, Any]]:
        """Every value the edits change, as (dotted path, old, new); missing old values are None."""
        return list(_diff(self.config or {}, self.edited_config(), ""))

    def use(self, writer: Writer) -> None:
        """Fit ``writer`` to this folder (the weights' file stem) and note whether its target carries the companions."""
        self.carried = writer.writes_folder
        if self.stem is not None and writer.writes_folder:
            writer.stem = self.stem

    def planned_files(self) -> list[PlannedFile]:
        """The companion files a folder target gets, with their sizes (for dry runs)."""
        return [
            PlannedFile(c.name, [], len(self.config_text().encode()) if c.name == CONFIG and self.edits else c.size)
            for c in self.companions
        ]

    def write(self, folder: Path) -> list[Path]:
        """Write the companions into ``folder`` (the run's staging folder); return their paths.

        config.json is written edited when a step edits it, every other file is copied as it is.
        A companion that can no longer be read is an error naming it (the run then leaves no target).
        """
        written = []
        for companion in self.companions:
            destination = folder / companion.name
            try:
                if companion.name == CONFIG and self.edits:
                    destination.write_text(self.config_text(), encoding="utf-8")
                else:
                    shutil.copyfile(companion.path, destination)
            except OSError as e:
                raise SourceError(companion.path, f"cannot carry this companion file into the target: {e.strerror or e}") from None
            written.append(destination)
        return written

    def render(self) -> list[str]:
        """The plan's lines about the folder: what is carried, and the config.json edits."""
        names = ", ".join(c.name + (" (edited)" if c.name == CONFIG and self.edits else "") for c in self.companions)
        where = {None: "", True: ", written into the target folder", False: ", not written: the target is a single file"}
        kind = "PEFT adapter folder" if self.adapter else "model folder"
        lines = [f"  {kind}: {len(self.companions)} companion files{where[self.carried]}: {names}"]
        changes = self.changes()
        if changes:
            lines.append("  config.json edits:")
            lines.extend(f"    {path}: {_json(old)} -> {_json(new)}" for path, old, new in changes)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "adapter": self.adapter,
            "companions": [c.name for c in self.companions],
            "not_carried": dict(self.left),
            "config_edits": {path: {"from": old, "to": new} for path, old, new in self.changes()},
            "carried": self.carried,
        }


def source_folder(source: SourceLike, opened: Source) -> Path | None:
    """The folder a source was given as (a model folder, or an index in one), or None for a file, dict or module."""
    if isinstance(opened, ShardedSafetensors):
        return opened.folder
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return Path(source)
    return None


def read_folder(folder: Path, pipeline: Transform, source: Source) -> ModelFolder | None:
    """The companions of ``folder`` and the config.json edits ``pipeline`` declares; None when it has no companions.

    Companions are the folder's regular files (links followed, as in the Hugging Face cache)
    except weights and their indexes, which the run writes anew; sub-folders and hidden files
    are not carried either.  Each entry left behind is listed with the reason.
    """
    companions: list[Companion] = []
    left: dict[str, str] = {}
    read = _source_files(source)
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.absolute() in read:
            continue  # the weights this run reads, and their index
        if name.startswith("."):
            left[name] = "hidden"
        elif entry.is_dir():
            left[name + "/"] = "a folder"
        elif entry.suffix.lower() in WEIGHT_SUFFIXES or name.endswith(".index.json"):
            left[name] = "weights the source does not read"
        elif entry.is_file():
            companions.append(Companion(name, entry, entry.stat().st_size))
        else:
            left[name] = "not a regular file"
    if not companions:
        return None
    config = _read_json(folder / CONFIG) if any(c.name == CONFIG for c in companions) else None
    edits: dict[str, Any] = {}
    if config is not None:
        proposed = pipeline.config_edits(source.metas(), config)
        edits = {key: value for key, value in proposed.items() if key not in config or config[key] != value}
    adapter = any(c.name == ADAPTER_CONFIG for c in companions)
    return ModelFolder(folder, companions, left, config, edits, adapter)


def _source_files(source: Source) -> set[Path]:
    """The files ``source`` reads its tensors from (and a shard index), as absolute paths."""
    if isinstance(source, ShardedSafetensors):
        return {shard.path.absolute() for shard in source.shards} | {source.folder.absolute() / INDEX_NAME}
    path = getattr(source, "path", None)
    return {Path(path).absolute()} if isinstance(path, (str, os.PathLike)) else set()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SourceError(path, f"cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(path, f"not valid JSON ({e}); a step's config.json edits cannot be applied to it") from None
    if not isinstance(data, dict):
        raise SourceError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def _diff(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """The leaves where ``new`` differs from ``old``; objects are compared key by key, anything else whole."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    elif old != new:
        yield path, old, new


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
