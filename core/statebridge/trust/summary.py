"""Reports about states (what analyses return), and the core's ``summary`` analysis (``statebridge inspect``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..readers.base import Source
from ..tensors.meta import TensorMeta, dtype_name, human_bytes
from ..tensors.patterns import compress_keys, describe_keys, family, shown
from ..tensors.provenance import FINGERPRINT_KEY, LINEAGE_KEY, VERSION_KEY, read_lineage


@dataclass
class Report:
    """A titled table plus free-form notes; renders as text or as a dict (``--json``)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        table = [self.columns, *[[str(c) for c in row] for row in self.rows]]
        widths = [max(len(str(r[i])) for r in table) for i in range(len(self.columns))]
        lines = [self.title]
        for i, row in enumerate(table):
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes, **self.data}


def summary(source: Source) -> Report:
    """Keys, shapes and dtypes of a state, with numbered layers folded into ranges."""
    metas = source.metas()
    buckets: dict[tuple[tuple[str, ...], TensorMeta], list[str]] = {}
    for key, meta in metas.items():
        buckets.setdefault((family(key), meta), []).append(key)
    rows = [[compress_keys(keys)[0], str(meta), len(keys)] for (_, meta), keys in buckets.items()]
    params = sum(m.numel for m in metas.values())
    size = sum(m.nbytes for m in metas.values())
    dtypes = Counter(dtype_name(m.dtype) for m in metas.values())
    notes = [
        f"{len(metas)} tensors, {params:,} elements, {human_bytes(size)}; "
        + ", ".join(f"{n} {d}" for d, n in dtypes.most_common())
    ]
    if source.skipped:
        notes.append(f"{len(source.skipped)} values that are not tensors are not part of the state: {describe_keys(source.skipped)}")
    metadata = dict(source.metadata)
    lineage, unreadable = read_lineage(metadata.pop(LINEAGE_KEY, None))
    if unreadable:
        notes.append(f"{LINEAGE_KEY} ignored: {unreadable}")
    if FINGERPRINT_KEY in metadata:
        notes.append(f"written by statebridge {metadata.pop(VERSION_KEY, '?')}, fingerprint {metadata.pop(FINGERPRINT_KEY)}")
    if lineage:
        notes.append(f"lineage recorded for {len(lineage)} tensors (statebridge inspect --lineage)")
    if metadata:
        notes.append("metadata: " + ", ".join(f"{shown(k)}={shown(_short(v))}" for k, v in sorted(metadata.items())))
    return Report(
        f"{source.name}",
        ["tensors", "dtype[shape]", "count"],
        rows,
        notes,
        {"tensors": len(metas), "elements": params, "bytes": size, "metadata": dict(source.metadata), "lineage": lineage},
    )


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def summaries(sources: list[Source]) -> Report:
    """:func:`summary` of one state, or of several, one section per state (``statebridge analyze summary A B``)."""
    if len(sources) == 1:
        return summary(sources[0])
    parts = [summary(source) for source in sources]
    rows = [[part.title, *row] for part in parts for row in part.rows]
    notes = [f"{part.title}: {note}" for part in parts for note in part.notes]
    return Report(f"{len(parts)} checkpoints", ["checkpoint", *parts[0].columns], rows, notes, {"checkpoints": [p.to_dict() for p in parts]})
