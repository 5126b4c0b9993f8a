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


def _truncate(q: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r ``(U·√Σ, √Σ·Vᵀ)`` of ``q·b`` (``b = qᵀ·M``, the matrix projected on the subspace ``q``)."""
    import torch

    ub, s, vt = torch.linalg.svd(b, full_matrices=False)
    root = s[:r].sqrt()
    return (q @ ub[:, :r]) * root, vt[:r] * root.unsqueeze(1)


def fit(
    w: torch.Tensor, d: torch.Tensor, rank: int, k: int, scheme: res.Scheme, block: int, *, alternations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, res.Residual]:
    """``U`` ``(out, r)``, ``V`` ``(r, in)`` (float16 values in float32) and the residual at ``k``.

    Memory stays at about three copies of ``W``: the scaled matrix, one work matrix for
    ``W̃ - L̃`` (its square picks the support; the values there are computed from the factors),
    and the input. The power step's products with ``W̃ - S̃`` take the sparse part as a CSR matrix.
    """
    import torch

    out, inp = w.shape
    dd = d.float().clamp_min(1e-4 * float(d.float().mean()) + 1e-30)
    root = dd.sqrt()
    scaled = w.float() * root
    width = min(rank + OVERSAMPLE, out, inp)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(scaled @ torch.randn(inp, width, generator=gen)).Q
    q = torch.linalg.qr(scaled @ (scaled.T @ q)).Q
    projected = q.T @ scaled  # qᵀ W̃, kept: it is also the next step's W̃ᵀ q
    u, v = _truncate(q, projected, rank)
    work = torch.empty_like(scaled)
    for _ in range(alternations):
        torch.addmm(scaled, u, v, alpha=-1.0, out=work)  # W̃ - L̃
        cols = res.support(work, None, k, scheme, block, inplace=True)
        rows = res.row_index(cols, scheme, block, out)
        vals = scaled.gather(1, rows) - torch.einsum("or,rok->ok", u, v[:, rows])
        sp = res.csr(rows, vals, inp)
        z = projected.T - sp.t() @ q                 # Mᵀ q with M = W̃ - S̃
        q = torch.linalg.qr(scaled @ z - sp @ z).Q  # M Mᵀ q
        projected = q.T @ scaled
        u, v = _truncate(q, projected - (sp.t() @ q).T, rank)
    del work
    u, v = u.half().float(), (v / root).half().float()
    left = torch.addmm(w.float(), u, v, alpha=-1.0)
    return u, v, res.fit(left, d, k, scheme, block)
