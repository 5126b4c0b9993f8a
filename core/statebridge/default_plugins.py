"""The core's own hook implementations, registered exactly as third-party plugins are.

Each module listed here implements hooks from :mod:`statebridge.hookspecs`:
the built-in transforms (registered by ``@register_transform`` on import), the
file writers, the plan checks, the ``summary`` analysis and the ``finite`` gate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import coverage
from . import transforms as _transforms  # noqa: F401 - importing registers the built-in transforms
from .analyze import Report, summary
from .checks import Finding
from .gates import GateDecision
from .hookspecs import hookimpl
from .writers.gguf import GGUFWriter
from .writers.safetensors import SafetensorsWriter
from .writers.torch_file import TorchWriter

if TYPE_CHECKING:
    import torch


class CorePlugin:
    """Hook implementations of the core (one object, registered under ``statebridge.core``)."""

    __name__ = "statebridge.default_plugins"

    @hookimpl
    def statebridge_export(self) -> Iterable[type]:
        return [SafetensorsWriter, GGUFWriter, TorchWriter]

    @hookimpl
    def statebridge_validate(self, plan: Any) -> Iterable[Finding]:
        """Report what the plan changes that a reader of the config might not expect."""
        findings = coverage.findings(plan)
        findings.extend(Finding("warning", message, "core.collision") for message in plan.collisions)
        if plan.dropped:
            findings.append(Finding("info", f"{len(plan.dropped)} source tensors are dropped on purpose", "core.dropped"))
        for key, ops in plan.changed.items():
            if any(op.startswith("adapt_shapes") for op in ops):
                findings.append(Finding("warning", "; ".join(op for op in ops if op.startswith("adapt_shapes")), "core.adapt_shapes", key))
        return findings

    @hookimpl
    def statebridge_analyses(self) -> Iterable[str]:
        return ["summary"]

    @hookimpl
    def statebridge_analyze(self, analysis: str, sources, model, options) -> Report | None:
        if analysis != "summary":
            return None
        return summary(sources[0])

    @hookimpl
    def statebridge_gate(self, key: str, candidate: torch.Tensor, inputs, group, options: Mapping[str, Any]) -> GateDecision | None:
        """``gates: {finite: true}`` rejects tensors with NaN or infinite values."""
        if not options.get("finite") or not candidate.is_floating_point():
            return None
        import torch

        bad = int((~torch.isfinite(candidate)).sum())
        return GateDecision(bad == 0, f"{bad} non-finite values" if bad else "all finite", {"non_finite": float(bad)}, "finite")


MODULES = [CorePlugin()]
