"""The ``.tprog`` progressive checkpoint: a model folder plus what growing it further needs.

::

    model.tprog/
    ├── weights.safetensors        plain safetensors: any safetensors tool reads it
    ├── config.json                the model's (transformers) config
    ├── progressive.json           ProgressiveMeta below; its JSON schema: progressive.schema.json
    ├── tokenizer/                 tokenizer files, copied as they are
    ├── training/                  optional: optimizer.safetensors (+ optimizer.json), scheduler.json, rng.safetensors
    └── ewc/                       optional: fisher.safetensors, old_params.safetensors

Nothing in a ``.tprog`` is ever executed: there are no hooks, no pickles (optimizer and RNG
state are safetensors plus JSON), and :func:`read_meta` validates ``progressive.json`` against
the schema, reporting a malformed file in one line naming the field.  Every growth step
(:class:`RecordsGrowth`: ``grow_depth``, ``grow_width``) appends its entry to
``expansion_history`` through the core's companion edits, so any run of a ``.tprog`` records
it: :func:`grow`, ``statebridge grow depth|width`` or a plain ``statebridge run``.  Any run
into a ``.tprog`` target writes this layout through :class:`TprogWriter`, the plugin's writer.
The training state and the EWC anchor describe the old shapes, so they are not carried into a
checkpoint whose shapes changed (the history entry says so, :func:`stale_parts`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import statebridge as sb
from statebridge.writers.safetensors import SafetensorsWriter

if TYPE_CHECKING:
    import torch

SUFFIX = ".tprog"
FORMAT_VERSION = "1.0.0"
WEIGHTS, CONFIG, META = "weights.safetensors", "config.json", "progressive.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Size(_Model):
    """A model's size: what config.json says, and the parameter count of the weights."""

    model_size: str | None = None  # a label such as "3B"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    parameters: int | None = None


class TrainingProgress(_Model):
    tokens_seen: int = 0
    steps: int = 0
    epochs: float = 0.0
    best_loss: float | None = None


class Expansion(_Model):
    """One growth: the sizes before and after and the statebridge steps that made it."""

    from_size: Size
    to_size: Size
    method: str  # the step names, e.g. "grow_depth(llama_pro)"
    steps: list[dict[str, Any]] = []  # the steps as config ({name: params}), enough to repeat the growth
    tokens_after: int | None = None  # tokens trained after this growth (filled in by training code)
    dropped: list[str] = []  # what the grown checkpoint no longer carries (training state, EWC anchor)


class RecommendedExpansion(_Model):
    next_size: str | None = None
    target_hidden_size: int | None = None
    target_num_layers: int | None = None
    method: str | None = None
    layer_duplication_indices: list[int] = []


class LayerAnalysis(_Model):
    """Block Influence scores (ShortGPT: 1 - cos(input, output) of each block over calibration text)."""

    metric: Literal["block_influence"] = "block_influence"
    importance_scores: list[float]
    expendable_layers: list[int] = []  # lowest influence first
    critical_layers: list[int] = []  # highest influence first
    calibration_tokens: int | None = None
    calibration_sha256: str | None = None


class EwcConfig(_Model):
    enabled: bool = True
    lambda_: float = Field(1000.0, alias="lambda")
    fisher: Literal["empirical", "true"] = "true"  # which Fisher ewc/fisher.safetensors holds (see ewc.py)
    fisher_samples: int = 0
    penalty: Literal["lambda/2 * sum F (theta - theta*)^2"] = "lambda/2 * sum F (theta - theta*)^2"
    stored: bool = False  # ewc/fisher.safetensors and ewc/old_params.safetensors are present

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ProgressiveMeta(_Model):
    """``progressive.json``: format version, family, size, progress, growth history and the analyses that steer growth."""

    format_version: str = Field(FORMAT_VERSION, pattern=r"^1\.\d+\.\d+$")
    model_family: str
    current_size: Size
    training_progress: TrainingProgress = TrainingProgress()
    expansion_history: list[Expansion] = []
    recommended_expansion: RecommendedExpansion | None = None
    layer_analysis: LayerAnalysis | None = None
    ewc_config: EwcConfig | None = None

    def dump(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=False) + "\n"


def json_schema() -> dict[str, Any]:
    """The JSON schema of ``progressive.json`` (published as ``progressive.schema.json`` beside this module)."""
    return ProgressiveMeta.model_json_schema(by_alias=True)


def is_tprog(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META).is_file()


def read_meta(path: str | os.PathLike[str]) -> ProgressiveMeta:
    """``progressive.json`` of the ``.tprog`` at ``path``, validated; a bad one is a one-line SourceError naming the field."""
    file = Path(path) / META
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise sb.SourceError(file, f"cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise sb.SourceError(file, f"not valid JSON ({e})") from None
    try:
        return ProgressiveMeta.model_validate(data)
    except ValidationError as e:
        from statebridge.transforms.base import format_validation_error

        raise sb.SourceError(file, format_validation_error(e, "")) from None


def size_of(config: Mapping[str, Any], metas: Mapping[str, sb.TensorMeta] | None = None, label: str | None = None) -> Size:
    """The :class:`Size` config.json describes (and the parameter count of ``metas``)."""
    return Size(
        model_size=label, hidden_size=config.get("hidden_size"),
        num_layers=config.get("num_hidden_layers", config.get("n_layer")),
        num_heads=config.get("num_attention_heads"), num_kv_heads=config.get("num_key_value_heads"),
        intermediate_size=config.get("intermediate_size"),
        parameters=sum(m.numel for m in metas.values()) if metas is not None else None,
    )


@dataclass
class Checkpoint:
    """A ``.tprog`` read back: its folder, metadata, config and (lazily) the tensors of each part."""

    path: Path
    meta: ProgressiveMeta
    config: dict[str, Any]

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path / WEIGHTS)

    def part(self, name: str) -> dict[str, torch.Tensor] | None:
        """``training/optimizer``, ``ewc/fisher``, ... as tensors; None when absent."""
        from safetensors.torch import load_file

        file = self.path / f"{name}.safetensors"
        return load_file(file) if file.is_file() else None

    def json(self, name: str) -> Any:
        file = self.path / f"{name}.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

    def load_into(self, model: torch.nn.Module, strict: bool = True) -> None:
        """Load the weights into ``model`` (its config must match config.json)."""
        missing, unexpected = model.load_state_dict(self.weights(), strict=False)
        missing = [k for k in missing if k not in _tied(model)]
        if strict and (missing or unexpected):
            raise sb.SourceError(self.path / WEIGHTS, f"does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def restore_rng(self) -> None:
        """Set torch's CPU RNG (and the CUDA ones saved) to the saved state."""
        import torch

        states = self.part("training/rng")
        if states is None:
            raise sb.SourceError(self.path / "training", "has no rng.safetensors")
        torch.set_rng_state(states["cpu"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"cuda.{i}" in states:
                    torch.cuda.set_rng_state(states[f"cuda.{i}"], i)


def _tied(model: Any) -> set[str]:
    """Keys ``model`` does not save because they are tied to another (transformers' tied lm_head)."""
    keys = getattr(model, "_tied_weights_keys", None) or ()
    return set(keys if not isinstance(keys, Mapping) else keys.keys())


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a ``.tprog``: validate ``progressive.json`` and read ``config.json``; tensors are read when asked for."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise sb.SourceError(path, f"is not a .tprog checkpoint (no {WEIGHTS})")
    meta = read_meta(path)
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise sb.SourceError(path / CONFIG, f"cannot read: {e}") from None
    return Checkpoint(path, meta, config)


def save(
    path: str | os.PathLike[str],
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    meta: ProgressiveMeta | None = None,
    *,
    family: str | None = None,
    tokenizer: str | os.PathLike[str] | Any | None = None,
    optimizer: Any | None = None,
    scheduler: Any | None = None,
    rng: bool = False,
    ewc: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a ``.tprog`` at ``path``, atomically (a staging folder renamed into place).

    ``model`` is a module or a state dict (tied tensors are saved once, as transformers does);
    ``config`` its config.json (a transformers config's ``to_dict()``); ``meta`` the metadata
    (default: a fresh one for ``family`` with the size the config describes).  ``tokenizer`` is a
    folder of tokenizer files or a transformers tokenizer (``save_pretrained``); ``optimizer`` a
    torch optimizer (its tensors into ``training/optimizer.safetensors``, the rest into
    ``optimizer.json``); ``scheduler`` anything with ``state_dict()`` of plain values; ``rng``
    saves torch's RNG states; ``ewc`` an :class:`~statebridge_progressive.ewc.EWC` whose Fisher
    and anchor go into ``ewc/`` and whose settings into ``ewc_config``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise sb.ConfigError(f"{path} exists; pass overwrite=True to replace it")
    state = _state(model)
    config = dict(config)
    if meta is None:
        meta = ProgressiveMeta(model_family=family or str(config.get("model_type", "unknown")),
                               current_size=size_of(config, {k: sb.TensorMeta(tuple(v.shape), v.dtype) for k, v in state.items()}))
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(state, staging / WEIGHTS)
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, staging / "tokenizer")
        if optimizer is not None or scheduler is not None or rng:
            (staging / "training").mkdir()
        if optimizer is not None:
            tensors, rest = _split_state(optimizer.state_dict())
            save_file(tensors, staging / "training/optimizer.safetensors")
            (staging / "training/optimizer.json").write_text(json.dumps(rest, indent=2) + "\n", encoding="utf-8")
        if scheduler is not None:
            (staging / "training/scheduler.json").write_text(json.dumps(scheduler.state_dict(), indent=2) + "\n", encoding="utf-8")
        if rng:
            save_file(_rng_states(), staging / "training/rng.safetensors")
        if ewc is not None:
            (staging / "ewc").mkdir()
            ewc.save(staging / "ewc")
            meta = meta.model_copy(update={"ewc_config": ewc.config(stored=True)})
        (staging / META).write_text(meta.dump(), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _state(model: Any) -> dict[str, torch.Tensor]:
    """A module's (or dict's) tensors, contiguous and each storage saved once (tied weights: the first name)."""
    tensors = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    out, seen = {}, set()
    for key, value in tensors.items():
        pointer = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and pointer in seen:
            continue  # a tied weight: transformers re-ties it on load
        seen.add(pointer)
        out[key] = value.detach().contiguous().cpu()
    return out


def _split_state(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """An optimizer state dict as tensors (``state.<param>.<name>``) and the JSON rest, with tensors replaced by their names."""
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().cpu()
            return {"__tensor__": name}
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{name}.{k}" if name else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{name}.{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, prefix)


def load_optimizer(checkpoint: Checkpoint, optimizer: Any) -> None:
    """Restore ``optimizer`` from ``training/optimizer.*`` (integer state keys as torch saves them)."""
    tensors = checkpoint.part("training/optimizer") or {}
    rest = checkpoint.json("training/optimizer")
    if rest is None:
        raise sb.SourceError(checkpoint.path / "training", "has no optimizer.json")

    def back(value: Any) -> Any:
        if isinstance(value, Mapping) and set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if isinstance(value, Mapping):
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return value

    state = back(rest)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    optimizer.load_state_dict(state)


def _rng_states() -> dict[str, torch.Tensor]:
    import torch

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return
    source = Path(tokenizer)
    folder.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copyfile(entry, folder / entry.name)


def grow(
    source: str | os.PathLike[str], steps: Sequence[sb.Transform], out: str | os.PathLike[str], *,
    overwrite: bool = False, family: str | None = None, **options: Any,
) -> sb.RunReport:
    """Run ``steps`` on ``source`` (a ``.tprog`` or a model folder) into the ``.tprog`` ``out``, recording the growth.

    A run like any other, into the ``.tprog`` format (:class:`TprogWriter`): the weights stream
    through statebridge (raw copies where bytes are unchanged), config.json gets the steps'
    edits, ``tokenizer/`` is carried, and ``expansion_history`` gains one entry per growth step,
    the entry that step declares (:class:`RecordsGrowth`), so this and a plain ``statebridge
    run`` write the same.  ``training/`` and ``ewc/`` describe the old shapes and are not
    carried.  ``family`` names the model family of a history that starts here (a model folder
    source); by default config.json's ``model_type``.
    """
    from statebridge.api import target_writer

    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise sb.ConfigError(f"{out} exists; pass --overwrite to replace it")
    if is_tprog(source):
        read_meta(source)  # a malformed progressive.json is one line naming the field, before any planning
    built = sb.plan(source, list(steps))
    writer = target_writer(built, out, format=TprogWriter.format)
    if family is not None and isinstance(writer, TprogWriter):
        writer.family = family
        writer.fit(built)
    try:
        return sb.run(built, None, out, writer=writer, overwrite=True, progress=False, **options)
    except sb.SourceError as e:
        raise sb.ExecutionError(str(e)) from None


#: the parts of a ``.tprog`` that hold one value per parameter of the model they were saved with
PARAMETER_PARTS = ("training/", "ewc/")


def stale_parts(left: Collection[str]) -> list[str]:
    """The parameter parts among a source folder's sub-folders ``left``: what a change of shapes makes stale."""
    return [part for part in PARAMETER_PARTS if part in left]


class TprogWriter(SafetensorsWriter):
    """Writes a ``.tprog`` target: ``weights.safetensors`` (one file), with the source's ``tokenizer/`` carried.

    config.json and progressive.json come with the steps' edits as the core writes every model
    folder's JSON companions; the source folder's other files are not part of a ``.tprog`` and are
    left (the plan lists them).  ``training/`` and ``ewc/`` hold one value per parameter of the
    source's shapes: they are carried only when the plan keeps every tensor's name and shape,
    otherwise left (the plan lists them; a growth step records them as ``dropped``).  From a
    model folder without progressive.json a fresh one is made, the steps' growth recorded into
    it as into a ``.tprog``'s.
    """

    format = "tprog"
    shareable = False

    def __init__(self, path: Path, *, metadata: Mapping[str, str] | None = None, shard_size: int | None = None) -> None:
        super().__init__(path, metadata=metadata, shard_size=shard_size)
        self.stem = Path(WEIGHTS).stem
        #: the model family of a history that starts here (default: config.json's model_type)
        self.family: str | None = None
        #: progressive.json made for a source that has none, written by :meth:`finish`
        self.fresh: str | None = None

    @property
    def writes_folder(self) -> bool:
        return True

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return target.suffix == SUFFIX

    def fit(self, plan: sb.Plan) -> None:
        folder = plan.folder
        if folder is None or folder.config is None:
            raise sb.ConfigError(f"{self.path}: a .tprog needs the model's config.json; give a model folder or .tprog source")
        for companion in [c for c in folder.companions if c.name not in (CONFIG, META)]:
            folder.companions.remove(companion)  # a .tprog holds its own files only (no hooks, no stray scripts)
            folder.left[companion.name] = "not part of a .tprog"
        source = plan.source.metas()
        same = {k: m.shape for k, m in source.items()} == {k: m.shape for k, m in plan.outputs.items()}
        stale = [] if same else stale_parts(folder.left)
        self.folders = tuple(name for name in ("tokenizer/", *PARAMETER_PARTS) if name not in stale)
        for name in stale:
            folder.left[name] = "holds the old shapes' parameters (the steps change them)"
        self.fresh = None
        plan.findings = [f for f in plan.findings if f.check != "progressive.tprog"]  # a plan may meet its writer twice
        if folder.read(META) is not None:
            try:
                meta = ProgressiveMeta.model_validate(folder.edited(META))
            except ValidationError as e:
                from statebridge.transforms.base import format_validation_error

                raise sb.ConfigError(f"{folder.path / META}: {format_validation_error(e, '')}") from None
            if "ewc/" in stale and meta.ewc_config is not None and meta.ewc_config.stored:
                plan.findings.append(sb.Finding(
                    "warning", f"{META} keeps ewc_config.stored: true, but ewc/ is left (a step changed shapes and no "
                    "growth step recorded it); set it to false after the run, or grow with grow_depth/grow_width",
                    "progressive.tprog"))
            return
        fresh = ProgressiveMeta(model_family=self.family or str(folder.config.get("model_type", "unknown")),
                                current_size=size_of(folder.config, source)).model_dump(mode="json", by_alias=True)
        view = sb.Companions.of({CONFIG: folder.config, META: fresh}, folder.left)
        edits = plan.pipeline.companion_edits(source, view).get(META, {})
        self.fresh = ProgressiveMeta.model_validate({**fresh, **edits}).dump()
        plan.findings.append(sb.Finding("info", f"{folder.path} has no {META}: the target's history starts here", "progressive.tprog"))

    def begin(self, metas: Mapping[str, sb.TensorMeta]) -> None:
        if self.fresh is not None:  # progressive.json is this run's too: a later run may replace it
            from statebridge.tensors.provenance import COMPANIONS_KEY

            names = json.loads(self.metadata.get(COMPANIONS_KEY, "[]"))
            self.metadata[COMPANIONS_KEY] = json.dumps(sorted({*names, META}))
        super().begin(metas)

    def layout(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.PlannedFile]:
        fresh = [sb.PlannedFile(META, [], len(self.fresh.encode()))] if self.fresh is not None else []
        return super().layout(metas) + fresh

    def _shards(self, metas: Mapping[str, sb.TensorMeta]) -> list[list[str]]:
        return [list(metas)]  # a .tprog holds one weights.safetensors, whatever its size

    def finish(self) -> list[Path]:
        files = super().finish()
        if self.fresh is not None:
            path = self.path / META
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.fresh)
                f.flush()
                self.sync(f.fileno())
            files.append(path)
        return files


class RecordsGrowth(sb.Transform):
    """A growth step: besides config.json, it edits a ``.tprog``'s ``progressive.json`` to record itself.

    Declared through the core's companion edits, so every run records it, whatever started it
    (``statebridge run``, ``statebridge grow``, :func:`grow`): the plan shows the edit, the
    fingerprint covers it and the target gets it in the same atomic commit as the weights.
    """

    def companion_edits(self, metas: Mapping[str, sb.TensorMeta], companions: sb.Companions) -> dict[str, dict[str, Any]]:
        edits = super().companion_edits(metas, companions)
        document, config = companions.read(META), companions.read(CONFIG)
        if document is None or config is None:
            return edits
        try:
            meta = ProgressiveMeta.model_validate(document)
        except ValidationError as e:
            from statebridge.transforms.base import format_validation_error

            raise sb.PlanError(f"{META}: {format_validation_error(e, '')}") from None
        dropped = stale_parts(companions.left)
        grown = recorded(meta, self, metas, {**config, **edits.get(CONFIG, {})}, dropped)
        new = grown.model_dump(mode="json", by_alias=True)
        return {**edits, META: {key: value for key, value in new.items() if document.get(key) != value}}


def recorded(meta: ProgressiveMeta, step: sb.Transform, metas: Mapping[str, sb.TensorMeta], config: Mapping[str, Any],
             dropped: Sequence[str]) -> ProgressiveMeta:
    """``meta`` after ``step`` grew the model: one more ``expansion_history`` entry, the new ``current_size``.

    ``metas`` is the state the step sees and ``config`` config.json after it.  The parameter count
    moves by what the step adds, so a step inside a ``scope`` (which sees only the scope's
    tensors) still counts the whole model.  The training state, the EWC anchor and the block
    analyses describe the old model: they are marked not stored (``dropped``) or cleared.
    """
    from statebridge.transforms.compose import compose

    outputs = compose([step], metas, on_collision="warn").metas
    before = meta.current_size
    after = size_of(config, outputs)
    if before.parameters is not None:
        after.parameters = before.parameters + sum(m.numel for m in outputs.values()) - sum(m.numel for m in metas.values())
    entry = Expansion(from_size=before, to_size=after, method=_method(step), steps=[step.spec()], dropped=list(dropped))
    ewc = meta.ewc_config.model_copy(update={"stored": False}) if meta.ewc_config is not None else None
    return meta.model_copy(update={"current_size": after, "expansion_history": [*meta.expansion_history, entry],
                                   "ewc_config": ewc, "layer_analysis": None, "recommended_expansion": None})


def _method(step: sb.Transform) -> str:
    method = getattr(step.params, "method", None)
    return f"{step.name}({method})" if method else step.name
