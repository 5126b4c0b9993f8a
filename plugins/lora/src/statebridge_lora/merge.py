"""PEFT's merge arithmetic, operation for operation, on plain tensors.

Each function here mirrors a piece of ``peft/tuners/lora`` (0.21): ``get_delta_weight`` of
``Linear``, ``Embedding`` and ``_ConvNd``, their ``merge`` (``safe_merge`` or not), the DoRA
variants' ``merge_unsafe``/``merge_safe``, ``add_weighted_adapter``'s ``cat`` and ``linear``
combinations, and (:class:`Layer`) the unmerge-and-merge-again that ``merge`` does before a
DoRA adapter when others are merged already.  The same torch operations in the same order give the same bits:
the tests compare against ``merge_and_unload`` with ``torch.equal``.  The one deliberate
difference is DoRA's zero-norm rows, where PEFT divides by zero and writes NaN: there the
factor is 1 (the row of ``W + ΔW`` is zero, so the merged row is zero too) and the rows are
counted for the merge report.

Dtypes follow PEFT's default path: ``PeftModel.from_pretrained`` upcasts float16/bfloat16
adapter weights to float32 (``autocast_adapter_dtype=True``), so the delta is float32, and a
Linear or Conv merge ``W += ΔW`` rounds once into the base dtype.  PEFT's Embedding merge
and every ``safe_merge`` round ΔW into the base dtype first (``ΔW.to(W.dtype)``), and so do we.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .adapter import LoraModule

if TYPE_CHECKING:
    import torch


@dataclass
class Factors:
    """One adapter's matrices for one module, as PEFT holds them after loading (float32)."""

    module: LoraModule
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def upcast(t: torch.Tensor) -> torch.Tensor:
    """PEFT's ``autocast_adapter_dtype``: float16 and bfloat16 adapter weights become float32."""
    import torch

    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def delta_weight(f: Factors, base_shape: tuple[int, ...]) -> torch.Tensor:
    """``get_delta_weight``: ``s·B·A`` shaped like the base weight (Linear, Conv1D, Embedding, Conv1d/2d).

    PEFT multiplies by ``s`` into a new tensor; multiplying in place gives the same values
    (and, for the transposed cases, the same strides) without a second float32 copy.
    """
    import torch.nn.functional as F

    a, b = f.a, f.b
    if f.module.kind == "embedding":
        return (b @ a).mul_(f.scaling).T
    if len(base_shape) == 2:
        out = (b @ a).mul_(f.scaling)
        return out.T if f.module.fan_in_fan_out else out
    if tuple(base_shape[2:4]) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).mul_(f.scaling).unsqueeze(2).unsqueeze(3)
    conv = F.conv1d if len(base_shape) == 3 else F.conv2d
    return conv(a.transpose(0, 1), b).mul_(f.scaling).transpose(0, 1)


@dataclass
class Measures:
    """The merge report's sums for one plain LoRA merge into a half-precision weight.

    Squares of float32 norms taken a block at a time and summed in Python floats (float64),
    which is closer to the float64 norm than one float32 norm of the whole tensor.
    """

    base: float  #: ‖W‖²
    update: float  #: ‖ΔW‖², PEFT's float32 delta
    exact: float  #: ‖W + ΔW‖², the float32 sum before its rounding
    error: float  #: ‖merged − (W + ΔW)‖², the rounding of the cast
    worst: float  #: max |merged − (W + ΔW)|


@dataclass
class Merged:
    """One merge step: the merged weight, and what the report needs from it.

    ``measures`` holds the report's figures when the merge measured them on the way (plain
    LoRA into a float16/bfloat16 weight: :func:`add_rounded`); otherwise ``exact`` is the
    float32 result before its cast into a float16/bfloat16 weight's dtype (None for float32
    and float64 weights, where nothing is rounded), ``update_norm`` is ‖ΔW‖ as PEFT computes
    ΔW for plain LoRA (None for DoRA, whose change is the whole rescaled row), and the
    report measures the rest.  ``zero_rows`` counts DoRA rows whose norm was zero.
    """

    out: torch.Tensor
    exact: torch.Tensor | None
    update_norm: float | None
    zero_rows: int = 0
    measures: Measures | None = None


def merge_one(weight: torch.Tensor, f: Factors, safe: bool, keep_exact: bool = True,
              workspace: torch.Tensor | None = None) -> Merged:
    """``weight`` with adapter ``f`` merged as PEFT's ``merge`` does.

    PEFT's ``W += ΔW`` on a half-precision ``W`` computes ``float(W) + ΔW`` in float32 and
    rounds once, so forming that sum (in ΔW's own buffer: addition commutes) and casting it
    gives the same bits.  For a Linear weight :func:`add_rounded` does it a block at a time
    and, with ``keep_exact``, takes the report's figures on the way; ΔW is then computed
    into ``workspace`` (float32, at least the weight's size) when one is given, so a run
    does not fault in a fresh float32 weight's worth of pages for every group.  Elsewhere
    ``keep_exact`` keeps the unrounded sum for the report.  At most the weight, ΔW in
    float32 and the result are held at once.
    """
    import torch

    half = weight.dtype not in (torch.float32, torch.float64)
    rounds = keep_exact and half
    if f.magnitude is None:
        if half and not safe and blockable(weight, f):
            out = None if workspace is None else workspace[: weight.numel()].view(weight.shape)
            product = torch.mm(f.b, f.a, out=out)  # get_delta_weight's B @ A, same bits (not by blocks of rows: those differ)
            merged, measures = add_rounded(weight, product, f.scaling, keep_exact)
            return Merged(merged, None, None, measures=measures)
        delta = delta_weight(f, tuple(weight.shape))
        update = float(torch.linalg.vector_norm(delta)) if keep_exact else None
        if safe or f.module.kind == "embedding":
            out = weight.clone()
            out += delta.to(weight.dtype)
            return Merged(out, delta.add_(weight) if rounds else None, update)
        if rounds:
            exact = delta.add_(weight)
            return Merged(exact.to(weight.dtype), exact, update)
        out = weight.clone()
        out += delta
        return Merged(out, None, update)
    delta = delta_weight(f, tuple(weight.shape))
    summed = weight + delta  # W first: the sum takes W's strides, as PEFT's does, and the norm sums in its order
    del delta
    merged, zero_rows = dora(weight, summed, f)
    return Merged(merged.to(weight.dtype), merged if rounds else None, None, zero_rows)


#: elements per block in :func:`add_rounded`: under torch's grain size (32768), so each operation
#: on a block runs on the calling thread.  Blocks of megabytes made every operation a parallel
#: region of torch's threads, and on a busy 2-core machine waiting at their barriers cost five
#: times the work (a 2.5 GB merge: 31.8 s of user CPU time with two threads, 5.9 s with one).
BLOCK = (1 << 15) - 1


def blockable(weight: torch.Tensor, f: Factors) -> bool:
    """Whether :func:`add_rounded` applies: a contiguous Linear weight, ΔW = (B @ A)·s laid out as W."""
    import torch

    return (f.module.kind == "linear" and not f.module.fan_in_fan_out and weight.dim() == 2 and f.b.dim() == 2
            and f.a.dtype == f.b.dtype == torch.float32 and weight.is_contiguous())


def add_rounded(weight: torch.Tensor, product: torch.Tensor, scaling: float,
                measure: bool) -> tuple[torch.Tensor, Measures | None]:
    """``(ΔW + float(W)).to(W.dtype)`` with ``ΔW = product·scaling``: PEFT's ``W += ΔW`` on a half-precision W.

    Each element is scaled and summed in float32 and rounded once, as PEFT's
    ``get_delta_weight`` and in-place add do, so the bits are PEFT's; but a block of rows at
    a time: each block is scaled, converted, summed, rounded and (``measure``) measured while
    it is in cache, on the calling thread (:data:`BLOCK`), where whole-tensor passes would
    read the weight from memory again for each.  ``product`` (``B @ A``) is overwritten
    (its rows become ``W + ΔW``); the only other buffer is one float32 block.
    """
    import torch

    norm = torch.linalg.vector_norm
    out = torch.empty_like(weight)
    w2, d2, o2 = (t.view(t.shape[0], -1) for t in (weight, product, out))
    rows = max(1, BLOCK // max(1, w2.shape[1]))
    scratch = torch.empty((min(rows, w2.shape[0]), w2.shape[1]), dtype=torch.float32)
    base = update = exact = error = worst = 0.0
    for start in range(0, w2.shape[0], rows):
        w, d, o = w2[start:start + rows], d2[start:start + rows], o2[start:start + rows]
        block = scratch[: w.shape[0]].copy_(w)
        d.mul_(scaling)  # ΔW
        if measure:
            base += float(norm(block)) ** 2
            update += float(norm(d)) ** 2
        d.add_(block)  # ΔW + float(W): PEFT's sum (addition commutes)
        o.copy_(d)  # the one rounding
        if measure:
            err = block.copy_(o).sub_(d)  # merged - exact, exactly (a half value is a float32 value)
            error += float(norm(err)) ** 2
            low, high = torch.aminmax(err)
            worst = max(worst, -float(low), float(high))
            exact += float(norm(d)) ** 2
    return out, Measures(base, update, exact, error, worst) if measure else None


def dora(weight: torch.Tensor, summed: torch.Tensor, f: Factors) -> tuple[torch.Tensor, int]:
    """DoRA's ``merge_unsafe`` (``merge_safe`` is the same for one adapter): ``m/‖W + ΔW‖ · (W + ΔW)``.

    ``summed`` is ``W + ΔW`` (consumed: it becomes the result).  The norm is of the unmerged
    base plus ΔW, as PEFT computes it (#3609).  PEFT adds ``W + 1·ΔW`` twice, for the norm and
    for the product; once is the same bits (``1·x`` is ``x``; the sum has the strides PEFT's
    has, so the norm adds in the same order) and two float32 copies of the weight less.  Rows
    whose norm is zero keep a factor of 1 (PEFT: NaN) and are counted.
    """
    factor, zero_rows = _dora_factor(f, _dora_norm(summed, f), weight.dim())
    summed *= factor  # PEFT: factor * (W + ΔW); the product is the same either way round
    return summed, zero_rows  # the caller casts to the base dtype


def merge_bias(bias: torch.Tensor, f: Factors, safe: bool) -> torch.Tensor:
    """``lora_bias``: the base bias plus ``s·lora_B.bias`` (``merge``'s in-place add, or safe_merge's copy)."""
    assert f.bias is not None
    if safe:
        return (bias + f.bias * f.scaling).to(bias.dtype)
    out = bias.clone()
    out += f.bias * f.scaling
    return out


def combine_cat(parts: list[tuple[Factors, float]], rank: int, use_rslora: bool) -> Factors:
    """``add_weighted_adapter(combination_type="cat")``: ``A = [w_i·s_i·A_i]``, ``B = [B_i]``, padded to ``rank``.

    The new adapter has ``r = lora_alpha = rank`` (the sum of the adapters' ranks) and
    keeps the first adapter's ``use_rslora``, so its scaling is 1 or ``sqrt(rank)``.
    """
    import torch

    a = torch.cat([f.a * weight * f.scaling for f, weight in parts], dim=0)
    b = torch.cat([f.b for f, _ in parts], dim=1)
    new_a = torch.zeros((rank, *a.shape[1:]), dtype=parts[0][0].a.dtype)
    new_b = torch.zeros((b.shape[0], rank, *b.shape[2:]), dtype=parts[0][0].b.dtype)
    new_a[: a.shape[0]] = a
    new_b[:, : b.shape[1]] = b
    return Factors(parts[0][0].module, new_a, new_b, _new_scaling(rank, use_rslora))


def combine_linear(parts: list[tuple[Factors, float]], rank: int, use_rslora: bool) -> Factors:
    """``add_weighted_adapter(combination_type="linear")``: ``A = Σ ±sqrt(|w_i·s_i|)·A_i``, ``B = Σ sqrt(|w_i·s_i|)·B_i``.

    PEFT's own caveat holds: this is not ``Σ w_i·ΔW_i`` (the cross terms stay); ``cat`` is.
    """
    import torch

    weights_a, weights_b = [], []
    for f, weight in parts:
        scaled = weight * f.scaling
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    dtype = parts[0][0].a.dtype
    mixed = []
    for tensors, weights in (([f.a for f, _ in parts], weights_a), ([f.b for f, _ in parts], weights_b)):
        stacked = torch.stack(tensors, dim=0)
        w = torch.tensor(weights)
        w = w.view(w.shape + (1,) * (stacked.dim() - w.dim()))
        mixed.append((stacked * w).sum(dim=0).to(dtype))
    return Factors(parts[0][0].module, mixed[0], mixed[1], _new_scaling(rank, use_rslora))


def _new_scaling(rank: int, use_rslora: bool) -> float:
    """The combined adapter's scaling: ``lora_alpha = r = rank``, with the first adapter's rsLoRA setting."""
    return rank / math.sqrt(rank) if use_rslora else rank / rank


class Layer:
    """PEFT's merge of several adapters into one layer, step for step: ``merge_and_unload(adapter_names=[...])``.

    PEFT merges the adapters in turn.  A DoRA adapter needs the norm of the *unmerged* base
    (PEFT #3609), so before merging it PEFT unmerges the adapters already merged (plain LoRA:
    ``W -= ΔW.to(dtype)``; DoRA: ``W / factor − ΔW``), takes the norm from the weight it gets
    back, and merges them again, carrying on from that rebuilt weight.  In float32, and more
    so in bfloat16, the rebuilt weight differs from the original in the last bits; this class
    does the same unmerges and merges in the same order, so the result has PEFT's bits.  It
    replaces the weight rather than changing it in place, so the base tensor is never written.
    """

    def __init__(self, weight: torch.Tensor, factors: dict[str, Factors], safe: bool) -> None:
        self.weight, self.factors, self.safe = weight, factors, safe
        self.merged: list[str] = []
        self.norms: dict[str, torch.Tensor] = {}
        self.unmerged_base: torch.Tensor | None = None
        #: the float32 result of the last merge before its cast (for the report), and the DoRA rows with zero norm
        self.exact: torch.Tensor | None = None
        self.zero_rows = 0

    def merge(self, names: list[str]) -> None:
        for name in names:
            f = self.factors[name]
            w = self.weight
            delta = delta_weight(f, tuple(w.shape))
            if f.magnitude is None:
                out = w.clone()
                if self.safe or f.module.kind == "embedding":
                    out += delta.to(w.dtype)
                else:
                    out += delta
                self.exact = w.float() + delta
            else:
                norm = self._with_unmerged_base(lambda base: _dora_norm(base + delta, f))
                factor, zero = _dora_factor(f, norm, w.dim())
                self.zero_rows += zero
                self.norms[name] = norm
                self.exact = factor * (self.weight + delta)  # the weight as the replay rebuilt it
                out = self.exact.to(w.dtype)
            self.weight = out
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            f = self.factors[name]
            delta = delta_weight(f, tuple(self.weight.shape))
            if f.magnitude is None:
                self.weight = self.weight - delta.to(self.weight.dtype)
            else:
                factor, _ = _dora_factor(f, self.norms.pop(name), self.weight.dim())
                self.weight = (self.weight / factor - delta).to(self.weight.dtype)

    def _with_unmerged_base(self, use):
        """``use(base)`` with the merged adapters taken out of the weight, then merged back (PEFT's ``_unmerged_base_weight``)."""
        if self.unmerged_base is not None:
            return use(self.unmerged_base)
        merged = self.merged[:]
        try:
            if merged:
                self.unmerge()
            self.unmerged_base = self.weight
            return use(self.unmerged_base)
        finally:
            again = [name for name in merged if name not in self.merged]
            if again:
                self.merge(again)
            self.unmerged_base = None


def _dora_norm(summed: torch.Tensor, f: Factors) -> torch.Tensor:
    """DoRA's ``get_weight_norm`` of ``W + ΔW`` (``summed``, added with W first, as PEFT adds them)."""
    import torch

    fifo = f.module.fan_in_fan_out or f.module.kind == "embedding"
    if summed.dim() == 2:
        oriented = summed.T if fifo else summed
        return torch.linalg.norm(oriented, dim=1).to(oriented.dtype)
    return summed.norm(p=2, dim=tuple(range(1, summed.dim())), keepdim=True).transpose(1, 0)


def _dora_factor(f: Factors, norm: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """``magnitude / norm`` shaped to multiply the weight; zero-norm rows get 1 (PEFT: inf or NaN), counted."""
    import torch

    factor = f.magnitude / norm
    zero = norm == 0
    zero_rows = int(zero.sum())
    if zero_rows:
        factor = torch.where(zero, torch.ones_like(factor), factor)
    if dim == 2:
        factor = factor.view(-1, 1)
        return (factor.T if f.module.fan_in_fan_out or f.module.kind == "embedding" else factor), zero_rows
    return factor.view(-1, *(1,) * (dim - 1)), zero_rows
