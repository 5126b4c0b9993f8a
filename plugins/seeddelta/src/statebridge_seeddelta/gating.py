"""The ``seeddelta.quality`` gate, registered through the core's gate hook, and how the builder polls every gate.

The gate reads the attempt's measures (``group.metrics``, the held-out ones when there are
held-out activations) against thresholds (``setting``: a :class:`.policy.Gating` as a dict,
or ``true`` for the attempt's own resolved thresholds): the primary metric's mean and 5th
percentile (``cos_xw``: ``cos_mean_x_w`` / ``cos_p05_x_w``; ``cos_w``: ``cos_mean_w``, the
fallback when no activations exist, with no tail), and the norm-ratio band. On anything
that is not a SeedΔ attempt it abstains (returns None). The builder asks every gate the
run names (``--gate NAME[=JSON]``, e.g. the core's ``finite``) with the dense ``Ŵ`` as the
candidate: a tensor passes only if every gate that votes accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from statebridge import GateDecision

if TYPE_CHECKING:
    import torch

NAME = "seeddelta.quality"


def picked(metrics: Mapping[str, float], metric: str) -> dict[str, float | None]:
    """The numbers the gate compares: mean, p05, norm ratio of ``metric``."""
    if metric == "cos_xw" and "cos_mean_x_w" in metrics:
        return {"mean": metrics["cos_mean_x_w"], "p05": metrics["cos_p05_x_w"], "norm_ratio": metrics["norm_ratio_x_w"]}
    return {"mean": metrics.get("cos_mean_w"), "p05": None, "norm_ratio": metrics.get("norm_ratio_x_w")}


def quality(key: str, candidate: torch.Tensor, inputs: Mapping[str, torch.Tensor], group: Any, setting: Any) -> GateDecision | None:
    """Accept when mean ≥ min_mean, p05 ≥ min_p05 (when both exist) and the norm ratio is inside the band."""
    found = getattr(group, "metrics", None)
    thresholds = getattr(group, "gating", None) if setting is True else setting
    if not isinstance(found, Mapping) or thresholds is None:
        return None
    if not isinstance(thresholds, Mapping):
        thresholds = thresholds.model_dump()
    got = picked(found, thresholds.get("metric", "cos_xw"))
    fails = []
    if got["mean"] is None or got["mean"] < thresholds["min_mean"]:
        fails.append(f"mean {got['mean']} < {thresholds['min_mean']}")
    if thresholds.get("min_p05") is not None and got["p05"] is not None and got["p05"] < thresholds["min_p05"]:
        fails.append(f"p05 {got['p05']:.4f} < {thresholds['min_p05']}")
    band = thresholds.get("norm_ratio")
    if band is not None and got["norm_ratio"] is not None and not band[0] <= got["norm_ratio"] <= band[1]:
        fails.append(f"norm ratio {got['norm_ratio']:.4f} outside [{band[0]}, {band[1]}]")
    numbers = {k: v for k, v in got.items() if v is not None}
    return GateDecision(not fails, "; ".join(fails) or "within thresholds", numbers)
