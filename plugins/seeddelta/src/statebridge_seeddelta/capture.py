"""``statebridge seeddelta capture``: record the inputs of a model's FFN weights on real text.

The model runs through ``transformers`` (a GGUF file is loaded with ``gguf_file=``, which
dequantizes it); forward pre-hooks on each ``gate_proj``/``up_proj``/``down_proj`` collect
their inputs, one row per token. The file holds, per weight, a float32 ``[n, in]`` matrix
named as the model's own checkpoint names it (GGUF names for a GGUF model), which is the
layout ``--activations`` and ``--eval-x`` read. ``max_tokens`` bounds the memory: an
``in``-wide float32 row per token per weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from statebridge import ConfigError, SourceError

from . import names


def load_model(model: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a model folder or a GGUF file, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if path.suffix.lower() == ".gguf":
        where, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        where = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": path.name} if "gguf_file" in kwargs else {}))
        loaded = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(model, f"transformers cannot load it: {e}".splitlines()[0]) from None
    return loaded.eval(), tokenizer


def capture(model_path: str, text: str, *, layers: set[int] | None = None, max_tokens: int = 4096,
            chunk: int = 512) -> dict[str, Any]:
    """``{weight name: [n, in] float32 inputs}`` of the FFN weights (of ``layers``, else all) over ``text``."""
    import torch

    model, tokenizer = load_model(model_path)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    if ids.numel() < 2:
        raise ConfigError("the text gives fewer than 2 tokens; give more text")
    is_gguf = Path(model_path).suffix.lower() == ".gguf"
    found: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for module_name, module in model.named_modules():
        kind = next((k for k in ("gate", "up", "down") if module_name.endswith(f"mlp.{k}_proj")), None)
        if kind is None:
            continue
        where = names.classify(f"{module_name}.weight")
        if where is None or (layers is not None and where[0] not in layers):
            continue
        key = names.gguf_name(*where) if is_gguf else f"{module_name}.weight"
        found[key] = []
        hooks.append(module.register_forward_pre_hook(
            lambda _m, args, key=key: found[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())))
    if not hooks:
        raise ConfigError(f"{model_path}: no mlp.gate_proj/up_proj/down_proj modules found (layers {sorted(layers or [])})")
    body = getattr(model, "model", model)  # the decoder without the LM head: its logits are not needed here
    try:
        with torch.no_grad():
            for start in range(0, ids.numel(), chunk):
                body(ids[start : start + chunk].unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).contiguous() for k, v in sorted(found.items())}
