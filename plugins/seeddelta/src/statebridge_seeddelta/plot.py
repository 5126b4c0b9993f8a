"""``statebridge seeddelta report R.json --png P``: the report's metrics per layer and tensor type, pass/fail marked.

matplotlib (a dependency of the plugin for this command alone) draws one panel per tensor
type: held-out ``cos_mean_x_w`` per layer (filled marker: emitted, hollow: failed gating),
its ``p05`` and top-K at the same bytes as lines, and the norm ratio on a second axis.
"""

from __future__ import annotations

import json
from pathlib import Path

from statebridge import ConfigError

from .names import TENSOR_TYPES


def plot(report_path: str, png: str) -> None:
    try:
        report = json.loads(Path(report_path).read_text())
        layers = report["layers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{report_path}: not a seeddelta build report ({e})") from None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the report plot needs matplotlib: pip install 'statebridge[seeddelta]'") from None
    fig, axes = plt.subplots(1, len(TENSOR_TYPES), figsize=(5 * len(TENSOR_TYPES), 4), squeeze=False)
    for ax, kind in zip(axes[0], TENSOR_TYPES):
        rows = sorted((int(L), e["tensors"][kind]) for L, e in layers.items() if kind in e.get("tensors", {})
                      and "metrics" in e["tensors"][kind])
        xs = [r[0] for r in rows]
        cos = [r[1]["metrics"].get("cos_mean_x_w", r[1]["metrics"].get("cos_mean_w")) for r in rows]
        p05 = [r[1]["metrics"].get("cos_p05_x_w") for r in rows]
        topk = [r[1]["topk_same_bytes"]["metrics"].get("cos_mean_x_w") for r in rows]
        nr = [r[1]["metrics"].get("norm_ratio_x_w") for r in rows]
        ok = [r[1]["decision"]["emit_delta"] for r in rows]
        ax.plot(xs, topk, "--", color="gray", label="top-K same bytes")
        ax.plot(xs, p05, ":", color="C0", label="cos p05")
        ax.scatter([x for x, g in zip(xs, ok) if g], [c for c, g in zip(cos, ok) if g], color="C0", label="cos mean (pass)")
        ax.scatter([x for x, g in zip(xs, ok) if not g], [c for c, g in zip(cos, ok) if not g], facecolors="none",
                   edgecolors="C3", label="cos mean (fail)")
        twin = ax.twinx()
        twin.plot(xs, nr, color="C2", alpha=0.6, label="norm ratio")
        twin.set_ylabel("norm ratio")
        twin.set_ylim(0.5, 1.5)
        ax.set_title(kind)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
