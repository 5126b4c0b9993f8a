"""What a model expects of a checkpoint: its keys with shapes, and which of them are tied.

The model is built from a ``config.json`` on the meta device through ``transformers`` (no
weights are allocated, so a 70B config costs nothing): the class its ``architectures`` names,
else ``AutoModelForCausalLM``, else ``AutoModel``.  Tied weights are read off the module
itself: parameters that are one object under several names (``lm_head.weight`` and
``model.embed_tokens.weight`` when the config ties them).  Non-persistent buffers (rotary
``inv_freq``) are not in ``state_dict()``, so a checkpoint holding them has orphans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statebridge.errors import ConfigError, SourceError


@dataclass(frozen=True)
class Expected:
    """The keys a model loads, with shapes, and its groups of tied names."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    #: each group is one tensor under several names; saving keeps any one of them
    tied: list[tuple[str, ...]]

    def tied_partners(self) -> dict[str, tuple[str, ...]]:
        return {key: group for group in self.tied for key in group}


def config_path(model: str | Path) -> Path:
    """``model`` as a config file: a folder's ``config.json``, or the file itself."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SourceError(path, "no such model config (give a model folder with config.json, or the config file)")
    return path


def expected_from_config(model: str | Path) -> Expected:
    """Build the model of ``model`` (a folder or its ``config.json``) on the meta device and list what it expects."""
    module, path = module_from_config(model)
    shapes = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    return Expected(f"{type(module).__name__} from {path}", shapes, tied_groups(module))


def tied_groups(module: Any) -> list[tuple[str, ...]]:
    """The module's parameters that are one object under several names (``lm_head.weight`` and
    ``model.embed_tokens.weight`` when the config ties them), each group in the module's order."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [tuple(group) for group in names.values() if len(group) > 1]


def module_from_config(model: str | Path) -> tuple[Any, Path]:
    """The model of ``model`` (a folder or its ``config.json``) built on the meta device, and the config file's path.

    The class the config's ``architectures`` names, else ``AutoModelForCausalLM``, else ``AutoModel``
    (the first that builds); no weights are allocated.
    """
    path = config_path(model)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConfigError(f"{model}: building a model from its config needs transformers and torch ({e})") from None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(path, f"is not a readable JSON config: {e}") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path))
    except Exception as e:  # transformers raises many types for a config it cannot use
        raise SourceError(path, f"transformers cannot read this config: {_one_line(e)}") from None
    named = [c for c in (getattr(transformers, a, None) for a in raw.get("architectures") or []) if c is not None]
    builders = [*named[:1], transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    failures = []
    with torch.device("meta"):
        for build in builders:
            try:
                return build(config), path
            except Exception as e:  # an auto class without this model_type, or a model that cannot be built from it
                failures.append(f"{getattr(build, '__qualname__', build)}: {_one_line(e)}")
    raise SourceError(path, f"transformers cannot build a model of type {raw.get('model_type')!r} from it ({'; '.join(failures)})")


def _one_line(error: Exception) -> str:
    """An exception from transformers as one short line (its messages often span several)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."
