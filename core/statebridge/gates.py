"""Gates: last-moment acceptance of computed tensors, through the ``statebridge_gate`` hook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class GateDecision:
    """A gate's verdict on one candidate tensor, with the numbers it looked at."""

    accept: bool
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    gate: str = ""


@dataclass(frozen=True)
class Candidates:
    """Alternatives for one output tensor, best first; a transform returns this instead of a tensor.

    The executor writes the first alternative that no gate rejects; if every one
    is rejected the run fails before anything is committed.
    """

    options: Sequence[torch.Tensor]
    labels: Sequence[str] = ()

    def label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"candidate {i}"


@dataclass
class GateRecord:
    """What happened to one output key at the gates."""

    key: str
    chosen: str
    decisions: list[tuple[str, GateDecision]]


def run_gates(
    key: str, value: torch.Tensor | Candidates, inputs: Mapping[str, torch.Tensor], group: Any, options: Mapping[str, Any]
) -> tuple[torch.Tensor, GateRecord | None]:
    """Pick the tensor to write for ``key``; raise :class:`GateRejectedError` if nothing passes."""
    from .errors import GateRejectedError
    from .plugins import get_plugin_manager

    hook = get_plugin_manager().hook.statebridge_gate
    alternatives = value if isinstance(value, Candidates) else Candidates([value], ["output"])
    decisions: list[tuple[str, GateDecision]] = []
    for i, candidate in enumerate(alternatives.options):
        label = alternatives.label(i)
        verdicts = [d for d in hook(key=key, candidate=candidate, inputs=inputs, group=group, options=options) if d]
        decisions.extend((label, d) for d in verdicts)
        if all(d.accept for d in verdicts):
            record = GateRecord(key, label, decisions) if decisions else None
            return candidate, record
    reasons = "; ".join(f"{label}: {d.gate or 'gate'} rejected ({d.reason})" for label, d in decisions if not d.accept)
    raise GateRejectedError(f"{key!r}: every candidate was rejected: {reasons}")
