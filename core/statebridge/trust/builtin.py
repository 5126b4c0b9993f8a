"""The core's checks, gate and analysis, registered as a default plugin like any third party's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..hookspecs import hookimpl

if TYPE_CHECKING:
    import torch

    from .findings import Finding
    from .gates import GateDecision


@hookimpl
def validate_plan(plan: Any) -> Iterable[Finding]:
    """Report what the plan changes that a reader of the config might not expect."""
    from . import companions, coverage, metadata, quantized
    from .findings import Finding

    findings = coverage.findings(plan)
    findings.extend(companions.findings(plan))
    findings.extend(quantized.type_changes(plan))
    findings.extend(metadata.findings(plan))
    findings.extend(Finding("warning", message, "core.collision") for message in plan.collisions)
    if plan.dropped:
        findings.append(Finding("info", f"{len(plan.dropped)} source tensors are dropped on purpose", "core.dropped"))
    adapted: dict[tuple[str, ...], str] = {}  # per distinct history (plans share one per step): its adapt_shapes ops
    for key, lineage in plan.lineage.items():
        ops = lineage.ops
        if ops:
            note = adapted.get(ops)
            if note is None:
                note = adapted[ops] = "; ".join(op for op in ops if op.startswith("adapt_shapes"))
            if note:
                findings.append(Finding("warning", note, "core.adapt_shapes", key))
    return findings


def finite(key: str, candidate: torch.Tensor, inputs: Any, group: Any, setting: Any) -> GateDecision | None:
    """``gates: {finite: true}`` rejects tensors with NaN or infinite values."""
    if not candidate.is_floating_point():
        return None
    import torch

    from .gates import GateDecision

    bad = int((~torch.isfinite(candidate)).sum())
    return GateDecision(bad == 0, f"{bad} non-finite values" if bad else "all finite", {"non_finite": float(bad)}, "finite")


@hookimpl
def register_gates(register):
    register("finite", finite)


@hookimpl
def register_analyses(register):
    from .summary import summaries

    register("summary", lambda sources, model, options: summaries(sources))
