"""Findings: what ``validate_plan`` hooks report about a plan, and running them."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from ..errors import PlanError

if TYPE_CHECKING:
    from ..planning.plan import Plan

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


def validate(plan: "Plan", hook: Callable[..., Iterable[Iterable[Finding] | None]]) -> list[Finding]:
    """Run the ``validate_plan`` hook caller ``hook`` once; raise :class:`PlanError` if any finding is an error."""
    findings = [f for result in hook(plan=plan) if result for f in result]
    plan.findings = findings
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise PlanError("the plan failed its checks:\n" + "\n".join(f"  {f}" for f in errors))
    return findings
