"""Quantized source tensors meeting the target: kept as their blocks, or dequantized, and the plan says which."""

from __future__ import annotations

from ..planning.plan import Plan
from ..writers.base import Writer
from .findings import Finding

CHECK = "plan.quantized"


def fit_types(plan: Plan, writer: Writer) -> None:
    """Tell ``plan`` whether ``writer`` keeps quantized tensors in their stored type, and say so as findings.

    A writer that stores quantized types (``stores_quantized``: GGUF) gets the carried
    ones as their raw blocks and is told which outputs were computed in float from
    quantized inputs (``writer.dequantized``: its ``general.file_type`` then no longer
    describes the file); any other format gets them dequantized to float32, and an info
    finding counts them.
    """
    plan.keeps_stored = writer.stores_quantized
    plan.findings = [f for f in plan.findings if f.check != CHECK]  # a plan may meet its writer twice
    metas = plan.source.metas()
    carried = {key: meta.stored for key, meta in plan.outputs.items() if meta.stored}
    computed = [
        key
        for key, lineage in plan.lineage.items()
        if not plan.outputs[key].stored and any(metas[s].stored for s in lineage.sources if s in metas)
    ]
    if carried and not plan.keeps_stored:
        types = ", ".join(sorted(set(carried.values())))
        plan.findings.append(Finding(
            "info",
            f"{len(carried)} quantized tensors ({types}) are dequantized to float32: {writer.format} has no such "
            "types (write a .gguf target to keep them as stored)",
            CHECK,
        ))
    if computed:
        plan.findings.append(Finding(
            "info",
            f"{len(computed)} tensors computed from quantized inputs are written in float32, e.g. {computed[0]!r}",
            CHECK,
        ))
    if plan.keeps_stored:
        writer.dequantized = computed  # type: ignore[attr-defined]  # only writers that store quantized types read it
