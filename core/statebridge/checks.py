"""Findings: what ``statebridge_validate`` hooks report about a plan, and running them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import PlanError

if TYPE_CHECKING:
    from .plan import Plan

Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One observation about a plan; ``error`` findings stop the run before anything is written."""

    level: Level
    message: str
    check: str = ""
    key: str | None = None

    def __str__(self) -> str:
        where = f" [{self.key}]" if self.key else ""
        by = f" ({self.check})" if self.check else ""
        return f"{self.level}{by}{where}: {self.message}"


def validate(plan: "Plan") -> list[Finding]:
    """Run every ``statebridge_validate`` hook; raise :class:`PlanError` if any finding is an error."""
    from .plugins import get_plugin_manager

    findings = [f for result in get_plugin_manager().hook.statebridge_validate(plan=plan) if result for f in result]
    plan.findings = findings
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise PlanError("the plan failed its checks:\n" + "\n".join(f"  {f}" for f in errors))
    return findings
