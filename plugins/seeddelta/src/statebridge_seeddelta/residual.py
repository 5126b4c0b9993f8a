"""The sparse residual Δ: ``K`` entries per row (``coo``) or ``K`` column indices shared by each ``block`` of rows.

Entries are picked by importance-weighted magnitude, ``d_j · R_ij²`` (the share of
``E‖R x‖²`` an entry carries when the inputs' second moments are ``d``); with ``block`` the
scores of a block's rows are summed and the block keeps the ``K`` best columns. Indices are
sorted within a row (block), stored as int16 when the input width allows it
(``in ≤ 32768``, so no index needs a sign), else int32; values as float16.

Bytes: ``coo`` ``out·K·(2 + idx)``, ``block`` ``2·out·K + idx·⌈out/block⌉·K`` (``idx`` = 2 or 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import threads

if TYPE_CHECKING:
    import torch

Scheme = Literal["coo", "block"]


def index_bytes(inp: int) -> int:
    return 2 if inp <= 32768 else 4


def nbytes(out: int, inp: int, k: int, scheme: Scheme, block: int) -> int:
    """Stored bytes of a residual with ``k`` entries per row (per block of rows for ``block``)."""
    if scheme == "coo":
        return out * k * (2 + index_bytes(inp))
    return 2 * out * k + index_bytes(inp) * -(-out // block) * k


def k_for_bytes(budget: int, out: int, inp: int, scheme: Scheme, block: int) -> int:
    """The largest ``K`` whose residual fits in ``budget`` bytes (at most ``in``)."""
    per = nbytes(out, inp, 1, scheme, block)
    return max(0, min(inp, budget // per))


@dataclass
class Residual:
    """``idx`` ``(out, K)`` for coo, ``(⌈out/block⌉, K)`` for block, int64 in memory; ``val`` ``(out, K)`` float16 values in float32."""

    scheme: Scheme
    block: int
    idx: torch.Tensor
    val: torch.Tensor

    def row_index(self) -> torch.Tensor:
        """``(out, K)`` column indices, one row per weight row."""
        return row_index(self.idx, self.scheme, self.block, self.val.shape[0])

    def dense(self, inp: int) -> torch.Tensor:
        import torch

        return torch.zeros(self.val.shape[0], inp).scatter_(1, self.row_index(), self.val)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x Δᵀ`` ``(N, out)`` by a sparse CSR product."""
        return (csr(self.row_index(), self.val, x.shape[1]) @ x.float().T).T

    def nbytes(self, inp: int) -> int:
        return nbytes(self.val.shape[0], inp, self.val.shape[1], self.scheme, self.block)


def csr(rows: torch.Tensor, vals: torch.Tensor, inp: int, *, check: bool = False) -> torch.Tensor:
    """The ``(out, in)`` sparse CSR matrix holding ``vals`` ``(out, K)`` at columns ``rows`` ``(out, K)``.

    Its products with dense matrices (``S @ z``, ``S.t() @ q``) are far faster than gathers
    and index-adds of the same entries, and sum each output in one fixed order. ``check``:
    validate the indices (they came from a file, not from a fit).
    """
    import warnings

    import torch

    out, k = rows.shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are long-standing
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.arange(0, out * k + 1, k, dtype=torch.int64), rows.reshape(-1),
                                       vals.reshape(-1), size=(out, inp), check_invariants=check)


def row_index(idx: torch.Tensor, scheme: Scheme, block: int, out: int) -> torch.Tensor:
    """Stored indices as ``(out, K)``: a block's row of indices repeated for each of its rows."""
    return idx if scheme == "coo" else idx.repeat_interleave(block, 0)[:out]


def scores(r: torch.Tensor, d: torch.Tensor | None, scheme: Scheme, block: int, *, inplace: bool = False) -> torch.Tensor:
    """``d_j · R_ij²`` per row (``coo``) or summed over each block of rows (``block``); ``d`` None: all ones.

    It does not depend on ``K``, so a caller trying several ``K`` on one target computes it once.
    ``inplace``: ``r`` is consumed.
    """
    import torch

    out, inp = r.shape
    score = r.square_() if inplace else r.square()
    if d is not None:
        score *= d
    if scheme == "block":
        groups = -(-out // block)
        if groups * block != out:
            score = torch.cat([score, torch.zeros(groups * block - out, inp)])
        score = score.view(groups, block, inp).sum(1)
    return score


def pick(score: torch.Tensor, k: int) -> torch.Tensor:
    """The column indices (sorted) of the ``k`` highest scores in each row of ``score`` (:func:`scores`)."""
    import torch

    return torch.topk(score, min(k, score.shape[1]), dim=1, sorted=False).indices.sort(dim=1).values


def support(r: torch.Tensor, d: torch.Tensor | None, k: int, scheme: Scheme, block: int, *,
            inplace: bool = False) -> torch.Tensor:
    """The chosen column indices (sorted) of the largest ``d_j · R_ij²`` (``d`` None: all ones; ``inplace``: ``r`` is consumed)."""
    return pick(scores(r, d, scheme, block, inplace=inplace), k)


def fit(target: torch.Tensor, d: torch.Tensor, k: int, scheme: Scheme, block: int, *,
        score: torch.Tensor | None = None) -> Residual:
    """The residual of ``target`` at ``k``: support by weighted magnitude, values = the target there, rounded to float16.

    ``score``: ``scores(target, d, scheme, block)`` when the caller has it.
    """
    idx = pick(scores(target, d, scheme, block) if score is None else score, k)
    return Residual(scheme, block, idx, target.gather(1, row_index(idx, scheme, block, target.shape[0])).half().float())


#: values at or above this are infinite in float16
FLOAT16_MAX = 65504.0

#: rows solved at once by :func:`refit` (bounds its ``(rows, K, K)`` systems)
REFIT_ROWS = 256


def refit(res: Residual, target: torch.Tensor, gram: torch.Tensor, ridge: float) -> None:
    """Replace ``res.val`` by the least-squares values on the activations whose Gram matrix is ``gram``.

    For each row, with support ``S``: ``(G_SS + λ·diag(G_SS)) v = (G t)_S``, the values that
    minimise ``‖X (t - v)‖²`` over the fit activations (``G = XᵀX``), ridge ``λ`` against
    over-fitting a small fit set. Magnitude-picked values assume uncorrelated inputs; real
    inputs are correlated, and the solved values recover much of what the dropped entries
    carried. A floor of ``1e-3·mean(diag G)`` on the diagonal keeps inputs that (almost) never
    fire from getting huge fitted values; a row whose system is not positive definite, or whose
    values would overflow float16, keeps its copied values. Rounded to float16 like any stored value.

    The systems are positive definite by construction, so they are solved by Cholesky, on one
    intra-op thread: torch's batched LU on CPU with two or more threads gives wrong pivots for
    systems of 150 or more unknowns (MKL "Parameter 6 was incorrect on entry to SLASWP", then an
    error, a hang or silently wrong values; pytorch/pytorch#142815), which is what broke the
    ``ffn_down`` refits at K ≥ 192 of a strict Gemma build; and a batch of such small systems
    only loses time to MKL's threads on a busy machine.
    """
    import torch

    rows = res.row_index()
    gt = target @ gram
    floor = 1e-3 * float(torch.diagonal(gram).mean()) + 1e-30  # near-dead inputs: bounded values, not fitted noise
    vals = res.val.clone()
    with threads.one():
        for start in range(0, rows.shape[0], REFIT_ROWS):
            idx = rows[start : start + REFIT_ROWS]
            sub = gram[idx.unsqueeze(2), idx.unsqueeze(1)]
            diag = torch.diagonal(sub, dim1=1, dim2=2)
            sub = sub + torch.diag_embed(ridge * diag + floor)
            rhs = gt[start : start + REFIT_ROWS].gather(1, idx)
            chol, info = torch.linalg.cholesky_ex(sub)
            solved = torch.cholesky_solve(rhs.unsqueeze(2), chol)
            # a row whose factorization failed (its solution is garbage, often finite), or whose values
            # would not fit float16, keeps its copied values
            good = (info == 0) & (solved.abs() < FLOAT16_MAX).all(dim=2).all(dim=1)
            vals[start : start + REFIT_ROWS][good] = solved.squeeze(2)[good]
    res.val = vals.half().float()
