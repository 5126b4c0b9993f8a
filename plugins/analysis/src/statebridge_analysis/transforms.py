"""``permute_rows``: reorder the rows (the first dimension) of every matching tensor.

What ``diff --content`` finds and ``--emit-rules`` writes when B holds A's rows in another order:
llama.cpp's ``convert_hf_to_gguf.py`` puts q and k through ``LlamaModel.permute`` (the rotary
interleave: ``rotary_heads: N``), other converters move rows by an explicit ``order``.  The core's
``permute`` reorders dimensions, not the rows within one, hence this step.  It is exactly invertible
(``statebridge run --inverse``): the reverse interleave, or the inverse order.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, model_validator

import statebridge as sb


def rotary_permutation(rows: int, heads: int) -> list[int]:
    """For each row of the output of llama.cpp's ``LlamaModel.permute(w, heads, heads)``, the row of ``w`` it holds.

    ``w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2).reshape(w.shape)``: within a head the
    two halves (rotary's real and imaginary parts) are interleaved.
    """
    half = rows // heads // 2
    return [h * 2 * half + s * half + i for h in range(heads) for i in range(half) for s in range(2)]


class PermuteRows(sb.Transform):
    """Row ``i`` of each output is row ``order[i]`` of its input (``rotary_heads``: llama.cpp's interleave of q and k)."""

    name = "permute_rows"

    class Params(sb.Params):
        pattern: str
        #: for each output row, the input row it holds (a permutation of ``range(rows)``)
        order: list[int] | None = Field(None, min_length=1)
        #: the rotary interleave of llama.cpp's ``LlamaModel.permute`` with this many heads (instead of ``order``)
        rotary_heads: int | None = Field(None, ge=1)
        #: with ``rotary_heads``: undo the interleave (GGUF back to Hugging Face)
        reverse: bool = False
        strict: bool = True

        @model_validator(mode="after")
        def _one_way(self) -> PermuteRows.Params:
            if (self.order is None) == (self.rotary_heads is None):
                raise ValueError("give either order or rotary_heads")
            if self.order is not None and sorted(self.order) != list(range(len(self.order))):
                raise ValueError(f"order {self.order[:8]}{'...' if len(self.order) > 8 else ''} is not a permutation of 0..{len(self.order) - 1}")
            if self.reverse and self.rotary_heads is None:
                raise ValueError("reverse goes with rotary_heads (give the inverse order instead)")
            return self

    def rows(self, key: str, meta: sb.TensorMeta) -> list[int]:
        """For each output row of ``key``, the input row it holds."""
        if meta.stored or not meta.shape:
            raise sb.PlanError(f"permute_rows: {key!r} ({meta}) has no rows to permute" + (" (block-quantized)" if meta.stored else ""))
        n = meta.shape[0]
        p = self.params
        if p.order is not None:
            if len(p.order) != n:
                raise sb.PlanError(f"permute_rows: order has {len(p.order)} rows, {key!r} ({meta}) has {n}")
            return list(p.order)
        if n % (2 * p.rotary_heads):
            raise sb.PlanError(f"permute_rows: {key!r} has {n} rows, not a multiple of 2 x {p.rotary_heads} heads")
        forward = rotary_permutation(n, p.rotary_heads)
        return _inverted(forward) if p.reverse else forward

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        groups = []
        for key in sb.select(self.params.pattern, metas, self.params.strict):
            meta = metas[key]
            rows = self.rows(key, meta)
            groups.append(sb.Group.map_one(key, key, sb.TensorMeta(meta.shape, meta.dtype), _take(rows), self._describe()))
        return groups

    def _describe(self) -> str:
        p = self.params
        if p.rotary_heads is not None:
            return f"permute_rows(rotary_heads={p.rotary_heads}{', reverse' if p.reverse else ''})"
        return f"permute_rows({len(p.order or ())} rows)"

    def inverse(self, metas: Mapping[str, sb.TensorMeta]) -> sb.Transform:
        p = self.params
        if p.rotary_heads is not None:
            return PermuteRows(pattern=p.pattern, rotary_heads=p.rotary_heads, reverse=not p.reverse, strict=p.strict)
        return PermuteRows(pattern=p.pattern, order=_inverted(list(p.order or ())), strict=p.strict)


def _inverted(order: list[int]) -> list[int]:
    out = [0] * len(order)
    for i, j in enumerate(order):
        out[j] = i
    return out


def _take(rows: list[int]):
    def fn(x):
        import torch

        return x.index_select(0, torch.tensor(rows, dtype=torch.long, device=x.device)).contiguous()

    return fn
