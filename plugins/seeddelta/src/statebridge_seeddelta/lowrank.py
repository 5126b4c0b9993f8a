"""The ``lowrank`` base: rank ``r`` plus the sparse residual, fitted together OATS-style.

OATS (Zhang & Papyan, ICLR 2025) alternates, in the importance-scaled space
``W̃ = W·diag(√d)`` (``d_j = E[x_j²]``, so ``‖(W - Ŵ)·diag(√d)‖_F²`` is the diagonal estimate
of ``E‖(W - Ŵ)x‖²``):

    L̃ ← best rank r of (W̃ - S̃)          S̃ ← the residual's support picked from (W̃ - L̃)

``alternations`` times, starting from ``S̃ = 0``. The rank-r step is a randomized subspace
iteration (a seeded Gaussian start, then one power step per alternation warm-started from
the previous subspace, with 8 extra columns and a small SVD to truncate), so an alternation
costs two thin matmuls rather than an SVD. At the end the factors are unscaled
(``V ← V·diag(1/√d)``), split ``√Σ`` to each side, rounded to float16, and the residual's
values are taken from ``W - U·V`` on the final support, so they correct the rounded base.
``d`` is floored at ``1e-4·mean(d)``: a column no input ever reaches would otherwise blow
up ``1/√d``. Stored: ``U`` ``(out, r)``, ``V`` ``(r, in)``, float16, ``2·r·(out + in)`` bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import residual as res

if TYPE_CHECKING:
    import torch

OVERSAMPLE = 8


def rank_for_bytes(budget: int, out: int, inp: int) -> int:
    return max(0, budget // (2 * (out + inp)))


def _truncate(q: torch.Tensor, m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r ``(U·√Σ, √Σ·Vᵀ)`` of ``m`` within the subspace ``q``, and ``U·Σ·Vᵀ``."""
    import torch

    b = q.T @ m
    ub, s, vt = torch.linalg.svd(b, full_matrices=False)
    root = s[:r].sqrt()
    u = (q @ ub[:, :r]) * root
    v = vt[:r] * root.unsqueeze(1)
    return u, v, u @ v


def fit(
    w: torch.Tensor, d: torch.Tensor, rank: int, k: int, scheme: res.Scheme, block: int, *, alternations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, res.Residual]:
    """``U`` ``(out, r)``, ``V`` ``(r, in)`` (float16 values in float32) and the residual at ``k``."""
    import torch

    out, inp = w.shape
    w = w.float()
    dd = d.clamp_min(1e-4 * float(d.mean()) + 1e-30)
    root = dd.sqrt()
    scaled = w * root
    ones = torch.ones_like(dd)
    width = min(rank + OVERSAMPLE, out, inp)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(scaled @ torch.randn(inp, width, generator=gen)).Q
    q = torch.linalg.qr(scaled @ (scaled.T @ q)).Q
    _, _, low = _truncate(q, scaled, rank)
    sparse = torch.zeros_like(scaled)
    for _ in range(alternations):
        sup = res.fit(scaled - low, ones, k, scheme, block)  # in the scaled space the weights are already in
        sparse.zero_().scatter_(1, sup.row_index(), sup.val)
        m = scaled - sparse
        q = torch.linalg.qr(m @ (m.T @ q)).Q
        _, _, low = _truncate(q, m, rank)
    m = scaled - sparse
    u, v, _ = _truncate(q, m, rank)
    u, v = u.half().float(), (v / root).half().float()
    left = w - u @ v
    return u, v, res.fit(left, d, k, scheme, block)
