"""Gates: last-moment acceptance of computed tensors; plugins register them with ``register_gates``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, GateRejectedError
from ..transforms.base import Candidates

if TYPE_CHECKING:
    import torch

    from ..registry import Catalog


@dataclass(frozen=True)
class GateDecision:
    """A gate's verdict on one candidate tensor, with the numbers it looked at."""

    accept: bool
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    gate: str = ""


@dataclass
class GateRecord:
    """What happened to one output key at the gates."""

    key: str
    chosen: str
    decisions: list[tuple[str, GateDecision]]


#: ``gate(key, candidate, inputs, group, setting)``: a verdict, or None to abstain
Gate = Callable[[str, "torch.Tensor", Mapping[str, "torch.Tensor"], Any, Any], "GateDecision | None"]


class Gates:
    """The gates one run applies: those its config's ``gates:`` names, each with its setting.

    A name no plugin registered is an error here, before anything is read (a
    typo such as ``finit: true`` would otherwise switch the gate off silently).
    A setting of ``false`` or ``null`` leaves that gate off.
    """

    def __init__(self, catalog: Catalog[Gate] | None = None, settings: Mapping[str, Any] | None = None) -> None:
        settings = dict(settings or {})
        for name in settings:
            if catalog is None or name not in catalog:
                message = catalog.unknown(name) if catalog is not None else f"unknown gate {name!r} (no gates installed)"
                raise ConfigError(f"gates: {message}")
        self.active = [(name, catalog.get(name), value) for name, value in settings.items() if value not in (None, False)]

    def choose(
        self, key: str, value: torch.Tensor | Candidates, inputs: Mapping[str, torch.Tensor], group: Any
    ) -> tuple[torch.Tensor, GateRecord | None]:
        """Pick the tensor to write for ``key``; raise :class:`GateRejectedError` if nothing passes."""
        alternatives = value if isinstance(value, Candidates) else Candidates([value], ["output"])
        decisions: list[tuple[str, GateDecision]] = []
        for i, candidate in enumerate(alternatives.options):
            label = alternatives.label(i)
            verdicts = []
            for name, gate, setting in self.active:
                decision = gate(key, candidate, inputs, group, setting)
                if decision is not None:
                    verdicts.append(decision if decision.gate else replace(decision, gate=name))
            decisions.extend((label, d) for d in verdicts)
            if all(d.accept for d in verdicts):
                return candidate, GateRecord(key, label, decisions) if decisions else None
        reasons = "; ".join(f"{label}: {d.gate} rejected ({d.reason})" for label, d in decisions if not d.accept)
        raise GateRejectedError(f"{key!r}: every candidate was rejected: {reasons}")
