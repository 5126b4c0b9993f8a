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
``(Σ_j d_j R_ij B_ij)² / Σ_j d_j B_ij²``. Of ``perm_trials`` seeds the one whose coefficients
lower it most (with ``r = 1``) is kept and gets its row scales; ``depth`` terms are fitted in
turn, each to what the previous ones left.
Coefficients and scales are rounded to float16 before the next step, so what is measured
is what is stored.

Matvec in ``O((Ta + Tb)·n log n + Ta·Tb·n)``: ``C x = H((H c) ⊙ (H x)) / n`` per tile, and
the column tiles of a row tile are summed in the Hadamard domain, before the one inverse.
"""

from __future__ import annotations

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

        self.seed, self.out, self.inp, self.n = seed, out, inp, n
        self.ta, self.tb = -(-out // n), -(-inp // n)
        self.rows = torch.from_numpy(permutation(seed, ROWS, out))
        self.cols = torch.from_numpy(permutation(seed, COLS, inp))
        self.s = torch.from_numpy(signs(seed, inp))

        self.positions = torch.empty(out, dtype=torch.int64)  # where row i sits in the permuted order
        self.positions[self.rows] = torch.arange(out)
        # a slot is the bit fields [row tile | sign | column tile | xor offset]: u ^ k sets the low
        # ones, so a row's fields xor a column's fields give the slot with no carries
        self._off = n.bit_length() - 1
        self._tiles = self._off + max(self.tb - 1, 0).bit_length()
        self.table_size = self.ta << (self._tiles + 1)

    def slots(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(out, in)`` int32: the slot of the signed table (:meth:`signed`) that each entry of the weight meets.

        Row ``i`` sits at permuted position ``p`` (row tile ``p // n``, offset ``u = p % n``),
        column ``j`` at ``q`` (column tile ``q // n``, offset ``q % n``, sign ``s_j``), so the
        entry meets ``c[p // n, q // n, u ^ (q % n)]``, negated where ``s_j = -1``. Gathering the
        table at these slots forms the term in the original order, scattering into it sums the
        xor-diagonals: no permuted copy of a matrix is ever made. ``out``: a buffer to fill
        (a fresh ``(out, in)`` tensor costs its page faults, which a loop over seeds need not pay).
        """
        import torch

        n = self.n
        cols = torch.empty(self.inp, dtype=torch.int64)
        cols[self.cols] = torch.arange(self.inp)
        row_key = ((self.positions // n) << (self._tiles + 1)) | (self.positions % n)
        col_key = ((self.s < 0).long() << self._tiles) | ((cols // n) << self._off) | (cols % n)
        return torch.bitwise_xor(row_key.int().unsqueeze(1), col_key.int().unsqueeze(0), out=out)

    def signed(self, c: torch.Tensor) -> torch.Tensor:
        """The flat table of coefficients ``c`` ``(Ta, Tb, n)``: ``c`` and ``-c`` in their slots, zero elsewhere."""
        import torch

        table = torch.zeros(self.ta, 2, self.table_size // (2 * self.ta * self.n), self.n)
        table[:, 0, : self.tb] = c
        table[:, 1, : self.tb] = -c
        return table.view(-1)

    def unsigned(self, table: torch.Tensor) -> torch.Tensor:
        """``(Ta, Tb, n)`` sums from a flat table filled at :meth:`slots`: the ``+`` half minus the ``-`` half."""
        halves = table.view(self.ta, 2, -1, self.n)
        return halves[:, 0, : self.tb] - halves[:, 1, : self.tb]

    def gather(self, c: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(out, in)``: ``s_j · c[...]`` at each entry, the term before its row scales (into ``out`` if given)."""
        import torch

        flat = None if out is None else out.view(-1)
        return torch.index_select(self.signed(c), 0, slots.view(-1), out=flat).view(self.out, self.inp)


@dataclass
class _Coefficients:
    """One seed's coefficients on a target, before row scales: ``c``, their gain with ``r = 1``, and ``H d'``."""

    lay: Layout
    c: torch.Tensor
    gain: float
    hw: torch.Tensor


def _coefficients(weighted: torch.Tensor, d: torch.Tensor, lay: Layout, slots: torch.Tensor | None = None) -> _Coefficients:
    """The xor-diagonal weighted means, from one scatter of ``weighted = target·d`` into the table at :meth:`Layout.slots`.

    The gain with every ``r_i = 1`` is ``Σ 2·c·sums - c²·den`` (``sums``: the diagonals' sums of
    ``s·d·R``, ``den``: of ``d``, an xor-convolution by FWHT), with ``c`` already rounded.
    ``slots``: a buffer for them.
    """
    import torch

    n, tb = lay.n, lay.tb
    slots = lay.slots(slots)
    sums = lay.unsigned(torch.zeros(lay.table_size).index_add_(0, slots.view(-1), weighted.view(-1)))
    w_p = torch.zeros(tb * n)
    w_p[: lay.inp] = d[lay.cols]
    hw = fwht(w_p.view(tb, n))
    mask = torch.zeros(lay.ta * n)
    mask[: lay.out] = 1.0
    den = fwht(fwht(mask.view(lay.ta, 1, n)) * hw) / n  # (Ta, Tb, n): Σ_u mask[a, u] d'[u ^ k]
    c = torch.where(den > 0, sums / den.clamp_min(1e-30), torch.zeros(())).half().float()
    return _Coefficients(lay, c, float((2 * c * sums - c.square() * den).sum()), hw)


def _row_scales(weighted: torch.Tensor, co: _Coefficients, slots: torch.Tensor | None = None,
                unscaled: torch.Tensor | None = None) -> tuple[XorTerm, float, torch.Tensor]:
    """The term with each row's least-squares scale, its gain, and the term before its scales (``s·c`` per entry).

    ``Σ_j d_j R_ij B_ij`` is a row's sum against the gathered coefficients; ``Σ_j d_j B_ij²``
    an xor-convolution of ``d`` with ``c²``, per row tile. ``slots``, ``unscaled``: buffers.
    """
    import torch

    lay = co.lay
    unscaled = lay.gather(co.c, lay.slots(slots), out=unscaled)
    num_r = torch.einsum("ij,ij->i", weighted, unscaled)
    den_r = (fwht(co.hw * fwht(co.c.square())).sum(1) / lay.n).view(-1)[lay.positions]
    ok = den_r > 0
    r = torch.where(ok, num_r / den_r.clamp_min(1e-30), torch.zeros(()))
    gain = float((num_r.square() / den_r.clamp_min(1e-30))[ok].sum())
    return XorTerm(lay.seed, co.c, r.half().float()), gain, unscaled


def fit_term(target: torch.Tensor, d: torch.Tensor, seed: int, n: int) -> tuple[XorTerm, float]:
    """One term fitted to ``target`` under importance ``d``: the term and its weighted-error reduction."""
    weighted = target * d
    term, gain, _ = _row_scales(weighted, _coefficients(weighted, d, Layout(seed, *target.shape, n)))
    return term, gain


def term_dense(term: XorTerm, out: int, inp: int) -> torch.Tensor:
    """The explicit ``(out, in)`` matrix of one term."""
    lay = Layout(term.seed, out, inp, term.c.shape[-1])
    return lay.gather(term.c, lay.slots()).mul_(term.r.unsqueeze(1))


def fit_stack(
    w: torch.Tensor, d: torch.Tensor, *, depth: int, trials: int, seed: int, n: int | None = None
) -> tuple[list[XorTerm], torch.Tensor]:
    """``depth`` terms, each the best of ``trials`` seeds on what the previous left; the terms and their dense sum.

    Trials are ranked by their coefficients' gain (one scatter pass each); only the kept
    seed gets its row scales (one gather pass), which can only add to its gain.
    """
    import torch

    out, inp = w.shape
    n = n or tile_size(out, inp)
    left = w.float().clone()
    weighted = torch.empty_like(left)
    slots = torch.empty(out, inp, dtype=torch.int32)  # buffers for every seed's slots and the kept terms
    unscaled = torch.empty_like(left)
    terms = []
    for t in range(depth):
        torch.mul(left, d, out=weighted)
        best = None
        for k in range(trials):
            co = _coefficients(weighted, d, Layout(term_seed(seed, t, k), out, inp, n), slots)
            if best is None or co.gain > best.gain:  # the first of equal gains
                best = co
        assert best is not None
        term, _, unscaled = _row_scales(weighted, best, slots, unscaled)
        terms.append(term)
        left.addcmul_(unscaled, term.r.unsqueeze(1), value=-1.0)
    del weighted, slots, unscaled
    return terms, left.neg_().add_(w)  # the stack's sum, W - (what it left), in place


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
        # Σ over column tiles in the Hadamard domain, one row tile at a time (a (N, Tb, n) product each)
        yp = fwht(torch.stack([(hx * hc[a]).sum(1) for a in range(ta)], 1)).reshape(x.shape[0], ta * n) / n
        y += yp[:, lay.positions] * term.r
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
