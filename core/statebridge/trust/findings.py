"""Findings: what ``validate_plan`` hooks report about a plan, and running them."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PlanError
from ..tensors.patterns import suggested_keys

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
    #: for a finding about keys that miss a known target: (keys made but not wanted, the target's keys nothing
    #: makes), each key -> its TensorMeta or None; an error with them asks the ``suggest_keys`` hook for the nearest
    near: tuple[Mapping[str, Any], Mapping[str, Any]] | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        where = f" [{self.key}]" if self.key else ""
        by = f" ({self.check})" if self.check else ""
        return f"{self.level}{by}{where}: {self.message}"


def validate(
    plan: "Plan", hook: Callable[..., Iterable[Iterable[Finding] | None]], suggest: Callable[..., Any] | None = None
) -> list[Finding]:
    """Run the ``validate_plan`` hook caller ``hook`` once; raise :class:`PlanError` if any finding is an error.

    ``suggest``: the ``suggest_keys`` hook caller; an error about keys that miss the target (a finding
    with ``near``) then ends with the nearest target keys plugins suggest (``did you mean: ...``).
    """
    findings = [f for result in hook(plan=plan) if result for f in result]
    plan.findings = findings
    errors = [f for f in findings if f.level == "error"]
    if errors:
        asked: set[int] = set()  # findings about one mismatch share its ``near``: suggested once, on the first
        lines = []
        for f in errors:
            near = f.near if f.near is not None and id(f.near) not in asked else None
            if near is not None:
                asked.add(id(near))
            lines.append(f"  {f}" + (suggested_keys(suggest, *near) if near else ""))
        raise PlanError("the plan failed its checks:\n" + "\n".join(lines))
    return findings
