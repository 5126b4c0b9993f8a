"""Block Influence (ShortGPT, Men et al. 2024): how much each block changes the hidden state.

``BI_i = 1 − mean over tokens of cos(x_i, y_i)``, with ``x_i`` the hidden state entering
block ``i`` and ``y_i`` the one leaving it, over calibration text.  A block whose output is
its input (a LLaMA-Pro copy with zeroed output projections) has BI exactly 0; a block that
turns the state around has BI near 1 or more.  The states are taken with forward hooks on the
blocks themselves, not from ``output_hidden_states``, whose last entry has the final norm
applied in transformers' decoders.

The recommendation is a heuristic, said as such: low-BI blocks change the state least, so a
copy of one is the least disruptive place to add depth (and the first candidates to prune);
the first and last blocks are kept out of it, as they are consistently the most influential.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from .tprog import LayerAnalysis, RecommendedExpansion


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's block list (``model.model.layers`` and the like)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the blocks of {type(model).__name__} (model.layers, transformer.h, ...)")


def block_influence(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """BI of every block of ``model`` over ``batches`` of token ids (each a [batch, length] tensor)."""
    blocks = blocks_of(model)
    sums = [0.0] * len(blocks)
    count = 0
    seen: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def capture(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            seen[index] = cosine(x.detach().float(), y.detach().float())
        return capture

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for ids in batches:
                seen.clear()
                model(ids)
                for i in range(len(blocks)):
                    sums[i] += float(seen[i].sum(dtype=torch.float64))
                count += seen[0].numel()
    finally:
        for handle in handles:
            handle.remove()
    if not count:
        raise ValueError("no calibration tokens")
    return [1.0 - s / count for s in sums]


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per token cos(x, y) over the hidden dim; exactly 1 where the block left the state exactly as it was."""
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return torch.where((x == y).all(dim=-1), torch.ones_like(cos), cos)


def analyze(model: torch.nn.Module, tokenizer: Any, text: str, max_tokens: int = 2048, length: int = 256,
            duplicate: int | None = None) -> tuple[LayerAnalysis, RecommendedExpansion]:
    """Block Influence over ``text`` (its first ``max_tokens`` tokens in pieces of ``length``) and the blocks to duplicate."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    if ids.numel() < 2:
        raise ValueError("the calibration text gives fewer than 2 tokens")
    scores = block_influence(model, [ids[i:i + length][None] for i in range(0, ids.numel(), length)])
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    inner = [i for i in order if 0 < i < len(scores) - 1] or order
    k = duplicate if duplicate is not None else max(1, len(scores) // 4)
    analysis = LayerAnalysis(
        importance_scores=scores, expendable_layers=inner[:k], critical_layers=order[::-1][:k],
        calibration_tokens=int(ids.numel()), calibration_sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
    picked = sorted(inner[:k])
    recommended = RecommendedExpansion(target_num_layers=len(scores) + len(picked), method="grow_depth(duplicate)",
                                       layer_duplication_indices=picked)
    return analysis, recommended
