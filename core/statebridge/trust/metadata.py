"""The metadata fields a run sets or deletes, said in the plan before any work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..tensors.provenance import MetadataValue, user_metadata
from .findings import Finding

if TYPE_CHECKING:
    from ..planning.plan import Plan

CHECK = "plan.metadata"


def findings(plan: Plan) -> list[Finding]:
    """The metadata the plan's options set and delete, as one info finding (run by the core's ``validate_plan``)."""
    edits = user_metadata(plan.options.get("metadata"))
    sets = [f"{key}={_short(value)}" for key, value in edits.items() if value is not None]
    deletes = [key for key, value in edits.items() if value is None]
    parts = ([f"sets {', '.join(sets)}"] if sets else []) + ([f"deletes {', '.join(deletes)}"] if deletes else [])
    return [Finding("info", "metadata: " + "; ".join(parts), CHECK)] if parts else []


def _short(value: MetadataValue, most: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."
