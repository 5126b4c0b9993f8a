"""One tensor's SeedΔ fit: a base (or none), the sparse residual, an optional row scale, and how it measures.

The budget is the residual's bytes at the requested ``K`` (plus, for ``xor_circulant``, the
few bytes of its terms). Within it:

- ``xor_circulant``: the stack (:mod:`.xorc`) then the residual of ``W - B`` at ``K``;
- ``lowrank``: rank ``r`` takes ``rank_share`` of the budget, the residual the rest
  (:mod:`.lowrank`);
- ``none``: the residual alone.

**A base is kept only when it earns its bytes**: the residual alone is fitted at the same
bytes (its ``K`` raised by what the base cost) and the base stays only if its
``cos_mean_x_w`` on the fit activations is higher; otherwise the tensor falls back to the
residual alone and ``base_check`` records both figures. With ``refit`` (and a fit set whose
Gram matrix fits: ``in ≤ 8192``), the residual's values are solved by ridge least squares
on the fit activations (:func:`.residual.refit`) instead of copied from ``W - B``. Then,
with ``row_scale``, each row gets its least-squares scale on the fit activations, times
one common factor that makes the mean output norm ratio 1 (float16; ``2·out`` bytes more). Every fit is reported beside
plain top-K (``coo`` by importance-weighted magnitude, no base, no scale) at the same total
bytes (``topk_same_bytes``).

Without activations the "fit activations" are Gaussian samples with the imatrix variances
(``synthetic``, said so in the report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import lowrank, metrics, residual, threads, xorc

if TYPE_CHECKING:
    import torch

Base = Literal["xor_circulant", "lowrank", "none"]


@dataclass(frozen=True)
class FitSpec:
    """The knobs of one fit (a policy resolves them per tensor; :mod:`.policy`)."""

    K: int
    base: Base = "lowrank"
    scheme: residual.Scheme = "coo"
    block: int = 32
    row_scale: bool = True
    depth: int = 2
    perm_trials: int = 4
    tile: int | None = None
    rank_share: float = 0.25
    alternations: int = 10
    refit: bool = True
    ridge: float = 0.05
    seed: int = 0


@dataclass
class Fit:
    """A fitted tensor: what is stored, and its measures."""

    shape: tuple[int, int]
    spec: FitSpec
    base: Base
    residual: residual.Residual
    terms: list[xorc.XorTerm] = field(default_factory=list)
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    base_check: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_fit: dict[str, float] = field(default_factory=dict)
    topk_same_bytes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def K(self) -> int:
        return int(self.residual.val.shape[1])

    @property
    def rank(self) -> int:
        return 0 if self.u is None else int(self.u.shape[1])

    def base_dense(self) -> torch.Tensor:
        import torch

        out, inp = self.shape
        if self.base == "xor_circulant":
            return xorc.dense(self.terms, out, inp)
        if self.base == "lowrank":
            assert self.u is not None and self.v is not None
            return self.u @ self.v
        return torch.zeros(out, inp)

    def approx(self) -> torch.Tensor:
        """Ŵ = diag(s)·(B + Δ), dense float32."""
        dense = self.base_dense() + self.residual.dense(self.shape[1])
        return dense if self.row_scale is None else dense * self.row_scale.unsqueeze(1)

    def outputs(self, x: torch.Tensor, *, scaled: bool = True) -> torch.Tensor:
        """``x Ŵᵀ`` for ``x`` ``(N, in)`` from the parts (sparse product, FWHT, thin factors), never forming ``Ŵ``."""
        y = self.residual.apply(x)
        if self.base == "xor_circulant":
            y += xorc.apply(self.terms, x, self.shape[0])
        elif self.base == "lowrank":
            assert self.u is not None and self.v is not None
            y += (x @ self.v.T) @ self.u.T
        return y * self.row_scale if scaled and self.row_scale is not None else y

    def weight_metrics(self, w: torch.Tensor, *, base: torch.Tensor | None = None,
                       w_norm2: torch.Tensor | None = None) -> dict[str, float]:
        """``cos_mean_w`` and ``rel_l2`` from per-row dot products and norms, never forming ``Ŵ``.

        ``⟨W_i, Ŵ_i⟩`` and ``‖Ŵ_i‖²`` come from the residual's entries plus the base's share:
        for ``lowrank`` from ``r``-wide products (``W Vᵀ``, ``V Vᵀ``, ``U V`` at the residual's
        columns), for ``xor_circulant`` from its dense matrix (``base``, when the caller has it);
        the row scale multiplies them by ``s_i`` and ``s_i²``. ``w_norm2``: ``‖W_i‖²`` when known.
        """
        import torch

        rows, val = self.residual.row_index(), self.residual.val
        dot = (w.gather(1, rows) * val).sum(1)
        norm2 = val.square().sum(1)
        if self.base == "lowrank":
            assert self.u is not None and self.v is not None
            u, v = self.u, self.v
            dot = dot + ((w @ v.T) * u).sum(1)
            low_at = torch.einsum("or,rok->ok", u, v[:, rows])
            norm2 = norm2 + ((u @ (v @ v.T)) * u).sum(1) + 2 * (low_at * val).sum(1)
        elif self.base == "xor_circulant":
            b = self.base_dense() if base is None else base
            dot = dot + torch.einsum("ij,ij->i", w, b)
            norm2 = norm2 + torch.einsum("ij,ij->i", b, b) + 2 * (b.gather(1, rows) * val).sum(1)
        if self.row_scale is not None:
            dot, norm2 = dot * self.row_scale, norm2 * self.row_scale.square()
        return metrics.row_metrics(torch.einsum("ij,ij->i", w, w) if w_norm2 is None else w_norm2, dot, norm2)

    def nbytes(self) -> int:
        out, inp = self.shape
        total = self.residual.nbytes(inp)
        if self.base == "xor_circulant":
            total += xorc.nbytes(self.terms)
        elif self.base == "lowrank":
            total += 2 * self.rank * (out + inp)
        return total + (2 * out if self.row_scale is not None else 0)

    def summary(self) -> dict[str, Any]:
        """The JSON-ready description of the fit (the report's ``metrics`` and the rest)."""
        out, inp = self.shape
        return {
            "base": self.base, "scheme": self.residual.scheme, "K": self.K,
            "block": self.residual.block if self.residual.scheme == "block" else None,
            "rank": self.rank, "depth": len(self.terms), "seeds": [t.seed for t in self.terms],
            "row_scale": self.row_scale is not None, "bytes": self.nbytes(), "dense_bytes_f16": 2 * out * inp,
            "bits_per_weight": round(8 * self.nbytes() / (out * inp), 4), "base_check": self.base_check,
            "metrics": self.metrics, "metrics_fit": self.metrics_fit, "topk_same_bytes": self.topk_same_bytes,
            "seconds": round(self.seconds, 3),
        }


def synthetic_inputs(d: torch.Tensor, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian samples with variances ``d``: stand-in activations when only an imatrix is known."""
    import torch

    return torch.randn(n, d.numel(), generator=torch.Generator().manual_seed(seed)) * d.clamp_min(0).sqrt()


def _row_scale(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares scales, times the one factor that brings the mean norm ratio on the fit set to 1.

    Matching each row's energy separately would amplify exactly the rows that lost most
    and cost cosine; the least-squares scale is the best per-row correction of direction,
    and one common factor (which cosine cannot see) then restores the output norm.
    """
    import torch

    den = y_hat.square().sum(0)
    s = torch.where(den > 0, (y * y_hat).sum(0) / den.clamp_min(1e-30), torch.ones(()))
    ny = y.norm(dim=1)
    keep = ny > 0
    ratio = ((y_hat * s).norm(dim=1)[keep] / ny[keep]).mean()
    return (s / ratio if float(ratio) > 0 else s).half().float()


def _cos_mean(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return metrics.output_metrics(y, y_hat).get("cos_mean_x_w", float("nan"))


def fit_tensor(
    w: torch.Tensor,
    d: torch.Tensor,
    spec: FitSpec,
    x_fit: torch.Tensor,
    x_eval: torch.Tensor | None = None,
    *,
    cache: dict[Any, Any] | None = None,
) -> Fit:
    """Fit ``w`` ``(out, in)`` with importance ``d`` ``(in,)`` by ``spec``; measure on ``x_eval`` (else ``x_fit``).

    ``cache`` (one dict per tensor, shared by its autotune attempts) keeps what does not
    depend on ``K``: the dense outputs, the xor-circulant stack, the residual's selection
    scores and the rows' norms.

    The fit runs on one torch thread (:mod:`.threads`; the setting is restored after), so a
    build's bytes are the same on any machine size. Tensors are fitted in parallel instead
    (``--jobs``, torchrun ranks), which is also faster on a shared machine.
    """
    with threads.one():
        return _fit_tensor(w, d, spec, x_fit, x_eval, {} if cache is None else cache)


def _fit_tensor(w: torch.Tensor, d: torch.Tensor, spec: FitSpec, x_fit: torch.Tensor, x_eval: torch.Tensor | None,
                cache: dict[Any, Any]) -> Fit:
    import torch

    start = time.perf_counter()
    w = w.float()
    out, inp = w.shape
    d = d.float()
    if "y_fit" not in cache:
        cache["y_fit"] = metrics.outputs(x_fit, w)
        cache["y_eval"] = metrics.outputs(x_eval, w) if x_eval is not None else cache["y_fit"]
        cache["gram"] = (x_fit.T.float() @ x_fit.float()) if spec.refit and inp <= MAX_REFIT_INPUTS else None
    y_fit = cache["y_fit"]
    budget = residual.nbytes(out, inp, spec.K, spec.scheme, spec.block)

    candidate = _with_base(w, d, spec, budget, cache) if spec.base != "none" else None
    if candidate is None:
        fit = Fit((out, inp), spec, "none", _residual(w, d, spec.K, spec, cache, "w"))
        y_hat = fit.outputs(x_fit)
        if spec.base != "none":
            fit.base_check = {"requested": spec.base, "kept": False,
                              "reason": "the budget leaves no bytes for the base, or its float16 factors overflow"}
    else:
        alone = Fit((out, inp), spec, "none",
                    _residual(w, d, residual.k_for_bytes(max(candidate.nbytes(), budget), out, inp, spec.scheme, spec.block),
                              spec, cache, "w"))
        y_with, y_without = candidate.outputs(x_fit), alone.outputs(x_fit)
        with_base, without = _cos_mean(y_fit, y_with), _cos_mean(y_fit, y_without)
        kept = with_base > without
        fit, y_hat = (candidate, y_with) if kept else (alone, y_without)
        fit.base_check = {
            "requested": spec.base, "kept": kept, "cos_mean_x_w_fit_with_base": round(with_base, 6),
            "cos_mean_x_w_fit_residual_only": round(without, 6),
            "reason": "improves the fit-set cos_mean_x_w at equal bytes" if kept
            else "residual alone at the same bytes fits the fit set as well or better",
        }
    if spec.row_scale:  # y_hat: the fit's outputs on the fit set, computed once and scaled here
        fit.row_scale = _row_scale(y_fit, y_hat)
        y_hat = y_hat * fit.row_scale
    x_eval_used = x_fit if x_eval is None else x_eval
    if "w_norm2" not in cache:
        cache["w_norm2"] = torch.einsum("ij,ij->i", w, w)
    stack = cache.get(_stack_key(spec)) if fit.base == "xor_circulant" else None
    weights = fit.weight_metrics(w, base=None if stack is None else stack[1], w_norm2=cache["w_norm2"])
    fit.metrics_fit = {**weights, **metrics.output_metrics(y_fit, y_hat)}
    fit.metrics = fit.metrics_fit if x_eval is None else {**weights, **metrics.output_metrics(cache["y_eval"], fit.outputs(x_eval))}
    k_eq = residual.k_for_bytes(fit.nbytes(), out, inp, "coo", 1)
    plain = residual.fit(w, d, k_eq, "coo", 1, score=_scores(w, d, "coo", 1, cache, "w"))
    fit.topk_same_bytes = {"K": k_eq, "bytes": plain.nbytes(inp), "metrics": {
        **Fit((out, inp), spec, "none", plain).weight_metrics(w, w_norm2=cache["w_norm2"]), **metrics.output_metrics(cache["y_eval"], plain.apply(x_eval_used))}}
    fit.seconds = time.perf_counter() - start
    return fit


def _scores(target: torch.Tensor, d: torch.Tensor, scheme: residual.Scheme, block: int, cache: dict[Any, Any],
            name: Any) -> torch.Tensor:
    """The residual's selection scores of ``target`` (:func:`.residual.scores`), kept in ``cache`` for the tensor's other attempts."""
    key = ("scores", name, scheme, block)
    if key not in cache:
        cache[key] = residual.scores(target, d, scheme, block)
    return cache[key]


#: the widest input whose Gram matrix (``in²`` float32) :func:`fit_tensor` builds for ``refit``
MAX_REFIT_INPUTS = 8192


def _residual(target: torch.Tensor, d: torch.Tensor, k: int, spec: FitSpec, cache: dict[Any, Any], name: Any) -> residual.Residual:
    """The residual of ``target`` (called ``name`` in ``cache``) at ``k``, its values solved on the fit activations when ``cache`` holds their Gram matrix."""
    res = residual.fit(target, d, k, spec.scheme, spec.block, score=_scores(target, d, spec.scheme, spec.block, cache, name))
    if spec.refit and cache.get("gram") is not None and k > 0:
        residual.refit(res, target, cache["gram"], spec.ridge)
    return res


def _stack_key(spec: FitSpec) -> tuple[Any, ...]:
    """What an xor-circulant stack depends on (not ``K``): its place in a tensor's cache."""
    return ("xor", spec.depth, spec.perm_trials, spec.tile, spec.seed)


def _with_base(w: torch.Tensor, d: torch.Tensor, spec: FitSpec, budget: int, cache: dict[Any, Any]) -> Fit | None:
    """The fit with ``spec.base`` inside ``budget`` (xor: its few bytes on top), or None if it cannot be had."""
    import torch

    out, inp = w.shape
    if spec.base == "xor_circulant":
        key = _stack_key(spec)
        if key not in cache:
            cache[key] = xorc.fit_stack(w, d, depth=spec.depth, trials=spec.perm_trials, seed=spec.seed, n=spec.tile)
        terms, base = cache[key]
        return Fit((out, inp), spec, "xor_circulant", _residual(w - base, d, spec.K, spec, cache, key), terms=terms)
    rank = lowrank.rank_for_bytes(int(spec.rank_share * budget), out, inp)
    k = residual.k_for_bytes(budget - 2 * rank * (out + inp), out, inp, spec.scheme, spec.block)
    if rank == 0:
        return None
    u, v, res = lowrank.fit(w, d, rank, k, spec.scheme, spec.block, alternations=spec.alternations, seed=spec.seed)
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
        return None  # a factor overflowed float16 (columns almost no input reaches): no base rather than a broken one
    if spec.refit and cache.get("gram") is not None and k > 0:
        residual.refit(res, w - u @ v, cache["gram"], spec.ridge)
    return Fit((out, inp), spec, "lowrank", res, u=u, v=v)
