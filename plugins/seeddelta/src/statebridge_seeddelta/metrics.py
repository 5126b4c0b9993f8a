"""What a fit is judged by: the weights themselves, and their outputs on activations.

- ``cos_mean_w``: the mean over rows of cos(W_i, Ŵ_i); ``rel_l2``: ‖W - Ŵ‖_F / ‖W‖_F.
- With activations ``X`` ``(N, in)``: per vector, ``cos(Wx, Ŵx)`` and ``‖Ŵx‖/‖Wx‖``;
  ``cos_mean_x_w``, ``cos_p05_x_w``, ``cos_p10_x_w`` (the 5th and 10th percentiles, the tail
  that predicts collapse better than the mean) and ``norm_ratio_x_w`` (the mean ratio:
  cosine cannot see an output that shrank). Vectors whose ``Wx`` is zero are left out.

``Y = X·Wᵀ`` is the same for every attempt on a tensor, so callers compute it once
(:func:`outputs`) and pass it in; ``Ŷ`` comes from the fit's parts (:meth:`.fit.Fit.outputs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def weight_metrics(w: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    w = w.float()
    return row_metrics(w.square().sum(1), (w * approx).sum(1), approx.square().sum(1))


def row_metrics(w_norm2: torch.Tensor, dot: torch.Tensor, approx_norm2: torch.Tensor) -> dict[str, float]:
    """The weight metrics from each row's ``‖W_i‖²``, ``⟨W_i, Ŵ_i⟩`` and ``‖Ŵ_i‖²`` (a zero row against a zero row: cos 1)."""
    import torch

    norms = (w_norm2 * approx_norm2).sqrt()
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-30), ((w_norm2 == 0) & (approx_norm2 == 0)).float())
    err = (w_norm2 - 2 * dot + approx_norm2).sum().clamp_min(0)
    return {"cos_mean_w": float(cos.mean()), "rel_l2": float(err.sqrt() / w_norm2.sum().sqrt().clamp_min(1e-30))}


def outputs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().T


def output_metrics(y: torch.Tensor, y_hat: torch.Tensor) -> dict[str, float]:
    import torch

    ny, nh = y.norm(dim=1), y_hat.norm(dim=1)
    keep = ny > 0
    y, y_hat, ny, nh = y[keep], y_hat[keep], ny[keep], nh[keep]
    if not len(y):
        return {}
    cos = (y * y_hat).sum(1) / (ny * nh).clamp_min(1e-30)
    q = torch.quantile(cos.double(), torch.tensor([0.05, 0.10], dtype=torch.float64))
    return {
        "cos_mean_x_w": float(cos.mean()),
        "cos_p05_x_w": float(q[0]),
        "cos_p10_x_w": float(q[1]),
        "norm_ratio_x_w": float((nh / ny).mean()),
    }
