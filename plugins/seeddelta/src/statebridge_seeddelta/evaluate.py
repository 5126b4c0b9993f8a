"""``statebridge seeddelta eval``: the model with its SeedΔ layers swapped in, against the dense model, on held-out text.

The per-tensor metrics say how each weight fares alone; what a user ships is the whole model,
where errors stack up layer after layer (the seed's "zombification"). So the model runs
through ``transformers`` over the same tokens twice per chunk, dense and with every layer of
the SeedΔ file swapped in (:func:`.runtime.swap_into`), and per token the next-token
distributions are compared: KL(dense ‖ seeded) and whether the top token is the same. These
are the two measures of llama.cpp's quantization tables, which are the yardstick (IQ4_XS:
mean KLD 0.0425, same top token 89.9 %). Beside them, the bytes: what the replaced weights
take in the model as stored and as float16, what their SeedΔ tensors take, and the difference.

Chunks are independent contexts of ``chunk`` tokens; one chunk's two sets of logits are held
at a time (``2 · chunk · vocab`` floats).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import statebridge as sb
from statebridge import ConfigError

from . import names


def end_to_end(model: str, seeded: str, text: str, *, max_tokens: int = 1024, chunk: int = 512) -> dict[str, Any]:
    """The measures of ``model`` with the SeedΔ layers of ``seeded`` swapped in, over the first ``max_tokens`` of ``text``."""
    import torch

    from .capture import load_model
    from .runtime import open_layers, swap_into

    layers = open_layers(seeded)
    if not layers:
        raise ConfigError(f"{seeded}: no SeedΔ layers in it (every weight stayed dense)")
    net, tokenizer = load_model(model)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    if ids.numel() < 2:
        raise ConfigError("the text gives fewer than 2 tokens; give more text")
    dense_modules = dict(net.named_modules())
    swapped = swap_into(net, layers)
    seeded_modules = dict(net.named_modules())

    def use(modules: dict[str, Any]) -> None:
        for name in swapped:
            parent, _, child = name.rpartition(".")
            setattr(dense_modules[parent] if parent else net, child, modules[name])

    kl, same = [], []
    with torch.no_grad():
        for start in range(0, ids.numel(), chunk):
            piece = ids[start : start + chunk].unsqueeze(0)
            use(dense_modules)
            p = net(piece).logits[0].float().log_softmax(-1)
            use(seeded_modules)
            q = net(piece).logits[0].float().log_softmax(-1)
            kl.append((p.exp() * (p - q)).sum(-1))
            same.append(p.argmax(-1) == q.argmax(-1))
    kld, top1 = torch.cat(kl).double(), torch.cat(same)
    stored, f16, delta = _bytes(model, seeded, list(layers))
    return {
        "model": str(model), "seeddelta_file": str(seeded), "tokens": int(kld.numel()), "chunk": chunk,
        "layers_swapped": len(swapped), "mean_kld": float(kld.mean()), "p99_kld": float(kld.quantile(0.99)),
        "same_top1": float(top1.float().mean()), "replaced_bytes_stored": stored, "replaced_bytes_f16": f16,
        "seeddelta_bytes": delta, "bytes_saved_if_stripped": stored - delta,
    }


def _bytes(model: str, seeded: str, weights: list[str]) -> tuple[int, int, int]:
    """What ``weights`` take in ``model`` as stored and as float16, and what their SeedΔ tensors take in ``seeded``."""
    with sb.open_source(model) as src:
        metas = src.metas()
        missing = [w for w in weights if w not in metas]
        if missing:
            raise ConfigError(f"{seeded}: its layer {missing[0]} is not a weight of {model}")
        stored = sum(metas[w].stored_nbytes for w in weights)
        f16 = sum(2 * metas[w].numel for w in weights)
    with sb.open_source(seeded) as src:
        parts = src.metas()
        delta = sum(parts[n].stored_nbytes for w in weights for n in (names.sd_name(w, p) for p in names.SUFFIXES)
                    if n in parts)
    return stored, f16, delta


def render(result: dict[str, Any]) -> str:
    """One paragraph for the terminal."""
    mb = 1e6
    return (f"seeddelta eval: {result['layers_swapped']} layers swapped in, {result['tokens']} tokens "
            f"(chunks of {result['chunk']})\n"
            f"  mean KLD {result['mean_kld']:.4f} (p99 {result['p99_kld']:.4f}), same top-1 {100 * result['same_top1']:.1f} %"
            f"  [llama.cpp IQ4_XS: 0.0425, 89.9 %]\n"
            f"  replaced weights {result['replaced_bytes_stored'] / mb:.1f} MB as stored "
            f"({result['replaced_bytes_f16'] / mb:.1f} MB as float16), SeedΔ {result['seeddelta_bytes'] / mb:.1f} MB: "
            f"{result['bytes_saved_if_stripped'] / mb:.1f} MB saved if stripped")
