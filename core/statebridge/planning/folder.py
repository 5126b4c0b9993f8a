"""Model folders: the files beside the weights (config, tokenizer, ...) and the edits a plan makes to the JSON ones.

A Hugging Face model folder holds more than tensors: ``config.json``,
``generation_config.json``, the tokenizer, chat templates, a README.  A run
from such a folder into a folder target writes these *companion* files into
the same staging folder as the tensors, so they are committed with them in one
atomic step.  ``config.json`` is written with the edits the pipeline's steps
declare (:meth:`statebridge.Transform.config_edits`: a cast sets ``dtype``,
a depth change ``num_hidden_layers``), and any other JSON companion with the edits
the steps declare to it (:meth:`statebridge.Transform.companion_edits`: a growth step
appends to a ``.tprog``'s ``progressive.json``); every other companion is copied byte
for byte.  Sub-folders are left behind unless the target's writer names them
(:attr:`statebridge.Writer.folders`: a ``.tprog`` carries ``tokenizer/``); those are
copied file by file into the same staging folder.  A PEFT adapter folder (``adapter_config.json``) is the same, and its
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

from ..errors import PlanError, SourceError
from ..readers.safetensors import INDEX_NAME, ShardedSafetensors
from ..transforms.base import CONFIG, Companions
from ..writers.base import PlannedFile

if TYPE_CHECKING:
    from ..readers import SourceLike
    from ..readers.base import Source
    from ..transforms.base import Transform
    from ..writers.base import Writer

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
    """A source model folder as a plan sees it: its companion files and the edits the steps make to its JSON ones."""

    path: Path
    companions: list[Companion]  # in name order
    left: dict[str, str]  # entries of the folder that are not carried -> why
    #: JSON companions read so far (config.json always, others when a step asked for them); None: not a companion
    documents: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    #: file name -> top-level key -> its new value, only values that change (config.json, progressive.json, ...)
    file_edits: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapter: bool = False  # a PEFT adapter folder (adapter_config.json)
    #: whether the target gets the companions (a folder target); None until a writer is known
    carried: bool | None = None
    #: sub-folders (``tokenizer/``) the target's writer carries unchanged (:attr:`Writer.folders`), taken out of ``left``
    folders: list[str] = field(default_factory=list)

    def read(self, name: str) -> dict[str, Any] | None:
        """The companion ``name`` as a JSON object (read once), or None when the folder does not carry such a file."""
        if name not in self.documents:
            known = any(c.name == name for c in self.companions)
            self.documents[name] = _read_json(self.path / name) if known else None
        return self.documents[name]

    @property
    def config(self) -> dict[str, Any] | None:
        """config.json as read, or None when there is none."""
        return self.read(CONFIG)

    @property
    def edits(self) -> dict[str, Any]:
        """config.json's edits: top-level key -> new value."""
        return self.file_edits.get(CONFIG, {})

    @property
    def stem(self) -> str | None:
        """The file stem the target's weights must keep to load (PEFT's ``adapter_model``), or None for the writer's own."""
        return ADAPTER_STEM if self.adapter else None

    def edited(self, name: str) -> dict[str, Any]:
        """The JSON companion ``name`` with the edits applied: same key order, edited values in place, new keys at the end."""
        return {**(self.read(name) or {}), **self.file_edits.get(name, {})}

    def edited_config(self) -> dict[str, Any]:
        """config.json with its edits applied."""
        return self.edited(CONFIG)

    def text(self, name: str) -> str:
        """The text of the edited file ``name``, indented as ``transformers`` (and ``.tprog``) write JSON."""
        return json.dumps(self.edited(name), indent=2) + "\n"

    def changes(self, name: str = CONFIG) -> list[tuple[str, Any, Any]]:
        """Every value the edits of ``name`` change, as (dotted path, old, new); missing old values are None."""
        return list(_diff(self.read(name) or {}, self.edited(name), ""))

    def use(self, writer: Writer) -> None:
        """Fit ``writer`` to this folder (the weights' file stem) and note whether its target carries the companions."""
        self.carried = writer.writes_folder
        if self.stem is not None and writer.writes_folder:
            writer.stem = self.stem
        left = {**self.left, **{name: "a folder" for name in self.folders}}  # a plan may meet a second writer
        wanted = {name.rstrip("/") + "/" for name in writer.folders} if writer.writes_folder else set()
        self.folders = sorted(name for name in left if name in wanted)
        self.left = {name: why for name, why in sorted(left.items()) if name not in wanted}

    def folder_files(self) -> list[tuple[str, Path]]:
        """The files of the carried sub-folders as (path relative to the folder, source path), in sorted order.

        Regular files only (links followed); hidden entries are skipped, as at the top level.
        """
        files = []
        for name in self.folders:
            for root, dirs, names in os.walk(self.path / name, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(names):
                    path = Path(root) / file
                    if not file.startswith(".") and path.is_file():
                        files.append((path.relative_to(self.path).as_posix(), path))
        return files

    def carried_names(self) -> list[str]:
        """Every file a folder target gets from here, relative to it: the companions and the carried sub-folders' files."""
        return sorted([c.name for c in self.companions] + [name for name, _ in self.folder_files()])

    def planned_files(self) -> list[PlannedFile]:
        """The companion files a folder target gets, with their sizes (for dry runs)."""
        return [
            PlannedFile(c.name, [], len(self.text(c.name).encode()) if c.name in self.file_edits else c.size)
            for c in self.companions
        ] + [PlannedFile(name, [], path.stat().st_size) for name, path in self.folder_files()]

    def write(self, folder: Path) -> list[Path]:
        """Write the companions into ``folder`` (the run's staging folder); return their paths.

        A JSON companion a step edits is written edited, every other file is copied as it is.
        A companion that can no longer be read is an error naming it (the run then leaves no target).
        """
        written = []
        for companion in self.companions:
            destination = folder / companion.name
            try:
                if companion.name in self.file_edits:
                    destination.write_text(self.text(companion.name), encoding="utf-8")
                else:
                    shutil.copyfile(companion.path, destination)
            except OSError as e:
                raise SourceError(companion.path, f"cannot carry this companion file into the target: {e.strerror or e}") from None
            written.append(destination)
        for name, path in self.folder_files():
            destination = folder / name
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)
            except OSError as e:
                raise SourceError(path, f"cannot carry this file into the target: {e.strerror or e}") from None
            written.append(destination)
        return written

    def render(self) -> list[str]:
        """The plan's lines about the folder: what is carried, and each file's edits (config.json first)."""
        names = ", ".join(c.name + (" (edited)" if c.name in self.file_edits else "") for c in self.companions)
        where = {None: "", True: ", written into the target folder", False: ", not written: the target is a single file"}
        kind = "PEFT adapter folder" if self.adapter else "model folder"
        lines = [f"  {kind}: {len(self.companions)} companion files{where[self.carried]}: {names}"]
        if self.folders:
            lines.append(f"  sub-folders carried unchanged: {', '.join(self.folders)}")
        for name in sorted(self.file_edits, key=lambda n: (n != CONFIG, n)):
            lines.append(f"  {name} edits:")
            lines.extend(f"    {path}: {_json(old)} -> {_json(new)}" for path, old, new in self.changes(name))
        return lines

    def to_dict(self) -> dict[str, Any]:
        def diff(name: str) -> dict[str, Any]:
            return {path: {"from": old, "to": new} for path, old, new in self.changes(name)}

        return {
            "path": str(self.path),
            "adapter": self.adapter,
            "companions": [c.name for c in self.companions],
            "not_carried": dict(self.left),
            "folders_carried": list(self.folders),
            "config_edits": diff(CONFIG),
            "companion_edits": {name: diff(name) for name in sorted(self.file_edits) if name != CONFIG},
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
    """The companions of ``folder`` and the edits ``pipeline`` declares to its JSON ones; None when it has no companions.

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
    found = ModelFolder(folder, companions, left, adapter=any(c.name == ADAPTER_CONFIG for c in companions))
    found.read(CONFIG)  # always: a bad config.json is an error even when no step edits it
    view = Companions(found.read, left)
    for name, proposed in pipeline.companion_edits(source.metas(), view).items():
        document = found.read(name)
        if document is None:
            raise PlanError(f"a step edits {name}, which {folder} does not have (edits go to existing JSON companions)")
        changed = {key: value for key, value in proposed.items() if key not in document or document[key] != value}
        if changed:
            found.file_edits[name] = changed
    return found


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
        raise SourceError(path, f"not valid JSON ({e}); a step's edits cannot be applied to it") from None
    if not isinstance(data, dict):
        raise SourceError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def _diff(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """The leaves where ``new`` differs from ``old``; objects are compared key by key, a list that only
    grows at its end item by item (``expansion_history[3]``: the new entry, not the whole history twice),
    anything else whole."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(new) > len(old) and new[: len(old)] == old:
        for i in range(len(old), len(new)):
            yield f"{path}[{i}]", None, new[i]
    elif old != new:
        yield path, old, new


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
