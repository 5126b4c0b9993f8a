"""The ``xor_circulant`` base: a seeded stack of xor-circulant terms, fitted by importance-weighted least squares.

One term, for a weight ``W`` of shape ``(out, in)``, with tile size ``n`` (a power of two)::

    B[i, j] = r[i] · s[j] · c[a, b, (p % n) ^ (q % n)]      p = pos_rows(i), q = pos_cols(j)
                                                              a = p // n,    b = q // n

``pos_rows`` / ``pos_cols`` are the seeded permutations and ``s`` the seeded column signs
(:mod:`.fwht`); the permuted rows and columns are padded up to whole tiles (``Ta × Tb``
tiles; the padding is never read back). Each tile is an xor-circulant matrix with its own
``n`` coefficients ``c[a, b]``; ``r`` is a per-row scale (it also stands in for row signs,
which would be redundant). So a term stores ``Ta·Tb·n + out`` numbers and its seed.

Fit of one term to a target ``R`` with column importance ``d`` (``E[x_j²]``), which
minimises ``Σ_ij d_j (R_ij - B_ij)²``: with ``r = 1`` the coefficients are weighted means
along the xor-diagonals, ``c[a,b,k] = Σ_u R'[u, u^k]·d'[u^k] / Σ_u d'[u^k]`` (the
denominator is an xor-convolution, by FWHT), then each row's scale is its weighted least
squares ``r_i = Σ_j d_j R_ij B_ij / Σ_j d_j B_ij²``, which lowers the weighted error by
``(Σ_j d_j R_ij B_ij)² / Σ_j d_j B_ij²``. Of ``perm_trials`` seeds the one lowering it most
is kept; ``depth`` terms are fitted in turn, each to what the previous ones left.
Coefficients and scales are rounded to float16 before the next step, so what is measured
is what is stored.

Matvec in ``O((Ta + Tb)·n log n + Ta·Tb·n)``: ``C x = H((H c) ⊙ (H x)) / n`` per tile, and
the column tiles of a row tile are summed in the Hadamard domain, before the one inverse.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .fwht import COLS, ROWS, fwht, permutation, signs

if TYPE_CHECKING:
    import torch


def tile_size(out: int, inp: int, cap: int = 4096) -> int:
    """The largest power of two not above the smaller dimension (and ``cap``)."""
    m = min(out, inp, cap)
    return 1 << (m.bit_length() - 1)


@dataclass
class XorTerm:
    """One fitted term: its seed, coefficients ``c`` ``(Ta, Tb, n)`` and row scales ``r`` ``(out,)``, float16 values in float32."""

    seed: int
    c: torch.Tensor
    r: torch.Tensor


class Layout:
    """A seed's permutations and signs for a weight of shape ``(out, inp)`` in tiles of ``n``."""

    def __init__(self, seed: int, out: int, inp: int, n: int) -> None:
        import torch

        self.out, self.inp, self.n = out, inp, n
        self.ta, self.tb = -(-out // n), -(-inp // n)
        self.rows = torch.from_numpy(permutation(seed, ROWS, out))
        self.cols = torch.from_numpy(permutation(seed, COLS, inp))
        self.s = torch.from_numpy(signs(seed, inp))


@functools.lru_cache(maxsize=4)
def _xor_index(n: int) -> torch.Tensor:
    """``[u, k] = u ^ k`` for ``u, k < n`` (kept: every trial of a tensor uses it)."""
    import torch

    u = torch.arange(n)
    return u.unsqueeze(1) ^ u.unsqueeze(0)


def fit_term(target: torch.Tensor, d: torch.Tensor, seed: int, n: int) -> tuple[XorTerm, float]:
    """One term fitted to ``target`` under importance ``d``: the term and its weighted-error reduction.

    Works one row tile at a time, never forming the permuted matrix or the term's own: the
    xor-gathered tile ``G[u, b, k] = (A·d)[u, b·n + (u ^ k)]`` gives both the coefficients
    (``Σ_u G``) and each row's ``Σ_j d_j A_ij B_ij`` (``Σ_bk G·c``), and ``Σ_j d_j B_ij²`` is an
    xor-convolution of ``d`` with ``c²``.
    """
    import torch

    out, inp = target.shape
    lay = Layout(seed, out, inp, n)
    w_p = torch.zeros(lay.tb * n)
    w_p[:inp] = d[lay.cols]
    hw = fwht(w_p.view(lay.tb, n))
    weight = lay.s * d
    xi = _xor_index(n)
    c = torch.zeros(lay.ta, lay.tb, n)
    r_p = torch.zeros(lay.ta * n)
    gain = 0.0
    for a in range(lay.ta):
        rows = lay.rows[a * n : (a + 1) * n]
        m = rows.numel()
        tile = torch.zeros(m, lay.tb * n)
        tile[:, :inp] = (target.index_select(0, rows) * weight).index_select(1, lay.cols)
        g = tile.view(m, lay.tb, n).gather(2, xi[:m].unsqueeze(1).expand(m, lay.tb, n))
        del tile
        mask = torch.zeros(n)
        mask[:m] = 1.0
        den = fwht(fwht(mask) * hw) / n  # (Tb, n): Σ_u mask[u] d'[u ^ k]
        ca = torch.where(den > 0, g.sum(0) / den.clamp_min(1e-30), torch.zeros(())).half().float()
        c[a] = ca
        num_r = (g * ca).sum((1, 2))
        del g
        den_r = (fwht(hw * fwht(ca.square())).sum(0) / n)[:m]
        ok = den_r > 0
        r_p[a * n : a * n + m] = torch.where(ok, num_r / den_r.clamp_min(1e-30), torch.zeros(()))
        gain += float((num_r.square() / den_r.clamp_min(1e-30))[ok].sum())
    r = torch.empty(out)
    r[lay.rows] = r_p[:out]
    return XorTerm(seed, c, r.half().float()), gain


def term_dense(term: XorTerm, out: int, inp: int) -> torch.Tensor:
    """The explicit ``(out, in)`` matrix of one term, built a row tile at a time."""
    import torch

    n = term.c.shape[-1]
    lay = Layout(term.seed, out, inp, n)
    pos = torch.empty(inp, dtype=torch.int64)
    pos[lay.cols] = torch.arange(inp)  # where column j sits in the permuted order
    xi = _xor_index(n)
    m_all = torch.empty(out, inp)
    for a in range(lay.ta):
        rows = lay.rows[a * n : (a + 1) * n]
        m = rows.numel()
        tile = term.c[a][:, xi[:m]].permute(1, 0, 2).reshape(m, lay.tb * n)  # [u, b·n + v] = c[a, b, u ^ v]
        m_all[rows] = tile.index_select(1, pos) * lay.s * term.r[rows].unsqueeze(1)
    return m_all


def fit_stack(
    w: torch.Tensor, d: torch.Tensor, *, depth: int, trials: int, seed: int, n: int | None = None
) -> tuple[list[XorTerm], torch.Tensor]:
    """``depth`` terms, each the best of ``trials`` seeds on what the previous left; the terms and their dense sum."""
    import torch

    out, inp = w.shape
    n = n or tile_size(out, inp)
    left = w.float().clone()
    terms = []
    for t in range(depth):
        fits = [fit_term(left, d, term_seed(seed, t, k), n) for k in range(trials)]
        term = max(fits, key=lambda f: f[1])[0]  # the first of equal gains
        terms.append(term)
        left -= term_dense(term, out, inp)
    return terms, w.float() - left


def term_seed(seed: int, term: int, trial: int) -> int:
    """The seed of trial ``trial`` of term ``term`` (below 2³¹, stored as int32)."""
    return (seed * 1_000_003 + term * 7919 + trial) % 2**31


def apply(terms: list[XorTerm], x: torch.Tensor, out: int) -> torch.Tensor:
    """``Σ_t B_t x`` for ``x`` of shape ``(N, in)`` by FWHT, never forming ``B``."""
    import torch

    y = torch.zeros(x.shape[0], out, dtype=torch.float32)
    for term in terms:
        ta, tb, n = term.c.shape
        lay = Layout(term.seed, out, x.shape[1], n)
        xp = torch.zeros(x.shape[0], tb * n, dtype=torch.float32)
        xp[:, : x.shape[1]] = (x.float() * lay.s).index_select(1, lay.cols)
        hx = fwht(xp.view(-1, tb, n))
        hc = fwht(term.c)
        yp = fwht(torch.einsum("Nbk,abk->Nak", hx, hc)).reshape(x.shape[0], ta * n) / n
        part = torch.empty(x.shape[0], out)
        part[:, lay.rows] = yp[:, :out]
        y += part * term.r
    return y


def dense(terms: list[XorTerm], out: int, inp: int) -> torch.Tensor:
    """The explicit ``(out, in)`` matrix of a stack (for ``reconstruct()`` and tests)."""
    import torch

    total = torch.zeros(out, inp)
    for term in terms:
        total += term_dense(term, out, inp)
    return total


def nbytes(terms: list[XorTerm]) -> int:
    """Stored bytes: float16 coefficients and row scales, an int32 seed per term."""
    return sum(2 * t.c.numel() + 2 * t.r.numel() + 4 for t in terms)
