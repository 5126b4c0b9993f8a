"""Reading a PEFT LoRA adapter folder from its config and its weights' header alone.

PEFT saves an adapter as ``adapter_config.json`` beside ``adapter_model.safetensors`` (or
``adapter_model.bin``), with keys ``base_model.model.<module>.<part>`` and the adapter's
name stripped: ``lora_A.weight``/``lora_B.weight`` (Linear, Conv, GPT-2's Conv1D),
``lora_embedding_A``/``lora_embedding_B`` (Embedding), ``lora_magnitude_vector`` (DoRA),
``lora_B.bias`` (``lora_bias=True``), and whole tensors that replace the base model's
(``modules_to_save``, biases with ``bias="all"``, an embedding's ``base_layer.weight`` when
PEFT saves embedding layers).  This module turns that into one :class:`LoraModule` per
adapted module and a table of replaced keys, reading no tensor data and importing no torch,
so a plan stays header-only.
"""

from __future__ import annotations

import json
import math
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import statebridge as sb

if TYPE_CHECKING:
    import torch

#: every key PEFT saves starts with this: PeftModel.base_model (LoraModel) .model (the wrapped model)
PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

#: key suffix -> the part of a LoRA module it holds
PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # how some PEFT versions name it
}

#: LoRA variants whose merge is not ``W + s·B·A`` (or DoRA): refused by name rather than merged wrongly
UNSUPPORTED_OPTIONS = (
    "use_bdlora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "arrow_config",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its tensors are and how PEFT scales them.

    ``kind`` is ``"linear"`` (also Conv1d/Conv2d and GPT-2's Conv1D: same keys, the base
    weight's rank tells them apart) or ``"embedding"``.  ``scaling`` is exactly PEFT's
    ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` for rsLoRA), a Python float as PEFT holds it.
    """

    name: str
    kind: str
    a: str
    b: str
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    magnitude: str | None = None
    bias: str | None = None

    @property
    def base_key(self) -> str:
        return f"{self.name}.weight"


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its config, its weights file, its modules and the base keys it replaces."""

    path: Path
    weights: Path
    config: dict[str, Any]
    metas: dict[str, sb.TensorMeta]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    #: base key -> adapter key whose tensor replaces it (modules_to_save, saved biases and base layers)
    replaced: dict[str, str] = field(default_factory=dict)
    _source: sb.Source | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Tensors ``keys`` of the adapter, copied out of the file's map.

        The weights file is opened on first use and kept open while this object lives
        (groups computed in worker threads share it), so a torch pickle is not parsed again
        for every group; it is closed when the adapter (and the plan holding it) goes.
        """
        with self._lock:
            if self._source is None:
                self._source = sb.open_source(self.weights)
                weakref.finalize(self, self._source.close)
            return {k: self._source.load(k).clone() for k in keys}

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def max_rank(self) -> int:
        """PEFT's rank for a combined adapter: ``r``, or the largest of ``rank_pattern`` (add_weighted_adapter)."""
        pattern = self.config.get("rank_pattern") or {}
        return max(int(self.config["r"]), *(int(v) for v in pattern.values())) if pattern else int(self.config["r"])


def pattern_key(patterns: Mapping[str, Any], name: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``name`` at a dot, else ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def weights_file(path: Path) -> Path:
    """The adapter's weights file in folder ``path`` (safetensors first, as PEFT loads it)."""
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    raise sb.SourceError(path, f"no {' or '.join(WEIGHT_NAMES)} in this adapter folder")


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of folder ``path``, checked to be a LoRA adapter this plugin can merge."""
    if not path.is_dir():
        raise sb.SourceError(path, "a PEFT adapter is a folder with adapter_config.json; this is not a folder")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise sb.SourceError(path, f"no {CONFIG_NAME}: not a PEFT adapter folder")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise sb.SourceError(file, f"cannot read it as JSON: {e}") from None
    if not isinstance(config, dict):
        raise sb.SourceError(file, "is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise sb.SourceError(file, f"peft_type is {kind!r}; statebridge-lora handles LoRA adapters (peft_type 'LORA') only")
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise sb.SourceError(file, f"{option}={config[option]!r} is a LoRA variant statebridge-lora does not merge")
    if "r" not in config or "lora_alpha" not in config:
        raise sb.SourceError(file, "has no 'r' or no 'lora_alpha'")
    return config


def open_adapter(path: str | Path) -> Adapter:
    """Read adapter folder ``path``: its config and its weights' header, no tensor data."""
    path = Path(path)
    config = read_config(path)
    weights = weights_file(path)
    with sb.open_source(weights) as source:
        metas = dict(source.metas())
    adapter = Adapter(path, weights, config, metas)
    parts: dict[str, dict[str, str]] = {}
    strange = []
    for key in metas:
        if not key.startswith(PREFIX):
            strange.append(key)
            continue
        inner = key[len(PREFIX):]
        for suffix, part in PARTS.items():
            if inner.endswith(suffix):
                module = inner[: -len(suffix)]
                kind = "embedding" if "embedding" in suffix else "linear"
                parts.setdefault(module, {"kind": kind})[part] = key
                break
        else:
            if "lora_" in inner or "modules_to_save" in inner:
                strange.append(key)
            else:
                adapter.replaced[inner.replace(".base_layer.", ".")] = key
    if strange:
        raise sb.SourceError(weights, f"keys that are not PEFT LoRA tensors: {', '.join(strange[:5])}"
                             + (f" and {len(strange) - 5} more" if len(strange) > 5 else ""))
    for module, found in sorted(parts.items()):
        adapter.modules[module] = _module(adapter, module, found)
    return adapter


def _module(adapter: Adapter, name: str, found: dict[str, str]) -> LoraModule:
    """The :class:`LoraModule` ``name`` from its keys, with PEFT's rank, alpha and scaling for it."""
    if "A" not in found or "B" not in found:
        raise sb.SourceError(adapter.weights, f"module {name!r} has {'B' if 'A' not in found else 'A'} but no "
                             f"{'A' if 'A' not in found else 'B'} matrix")
    config = adapter.config
    a, b = adapter.metas[found["A"]], adapter.metas[found["B"]]
    rank = a.shape[0]
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    r = ranks.get(pattern_key(ranks, name), config["r"])
    alpha = alphas.get(pattern_key(alphas, name), config["lora_alpha"])
    if rank != r or b.shape[1] != r:
        raise sb.SourceError(adapter.weights, f"module {name!r}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, "
                             f"but the config gives it rank {r}")
    if found.get("magnitude") and not adapter.use_dora:
        raise sb.SourceError(adapter.weights, f"module {name!r} has a DoRA magnitude but the config has use_dora false")
    if adapter.use_dora and not found.get("magnitude"):
        raise sb.SourceError(adapter.weights, f"module {name!r} has no lora_magnitude_vector but the config has use_dora true")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraModule(
        name=name, kind=found["kind"], a=found["A"], b=found["B"], r=r, alpha=alpha, scaling=scaling,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")), magnitude=found.get("magnitude"), bias=found.get("bias"),
    )
