"""The plan: every group a run will execute, known from headers before any tensor byte is read."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..transforms.compose import Lineage, compose
from ..readers.base import RawSpan, Source
from ..tensors.meta import TensorMeta, human_bytes
from ..tensors.patterns import compress_keys
from ..transforms.base import CONFIG, ZEROS, Group, Transform
from ..transforms.composite import Pipeline
from .folder import ModelFolder


@contextmanager
def paused_gc() -> Iterator[None]:
    """Hold CPython's cyclic garbage collector off while planning.

    Planning builds several small containers per tensor and frees none of them, so
    every collection scans them all again: on 200,000 tensors the collector took
    more than half the time.  Plans hold no reference cycles that need collecting
    sooner; the collector runs as usual once planning is done.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Plan:
    """A pipeline planned against a source: executable groups, target metadata, lineage and counts."""

    source: Source
    pipeline: Pipeline
    groups: list[Group]  # in execution order (source storage order); unchanged tensors included
    outputs: dict[str, TensorMeta]  # target tensors in write order
    lineage: dict[str, Lineage]
    mapped: list[str]  # source keys some step consumed
    unmapped: list[str]  # source keys no step consumed (carried over unchanged)
    dropped: list[str]  # source keys removed by a drop step
    new: list[str]  # target keys made from no source key
    collisions: list[str] = field(default_factory=list)  # collisions let through by on_collision: warn
    overwritten: list[str] = field(default_factory=list)  # source keys lost to those collisions
    options: dict[str, Any] = field(default_factory=dict)
    findings: list[Any] = field(default_factory=list)
    estimate: Any = None  # an Estimate, once statebridge.execute.estimate has priced the plan
    providers: Mapping[str, str] = field(default_factory=dict)  # transform name -> the plugin that provides it
    folder: ModelFolder | None = None  # the source's model folder: companion files and config.json edits
    #: whether the target keeps quantized tensors in their stored type (a GGUF target); None until
    #: the plan meets its writer (``trust.quantized.fit_types``), and then raw copies of them are not offered
    keeps_stored: bool | None = None


    @classmethod
    def build(
        cls,
        source: Source,
        pipeline: Transform,
        options: Mapping[str, Any] | None = None,
        providers: Mapping[str, str] | None = None,
    ) -> "Plan":
        """Plan ``pipeline`` on ``source``'s headers; ``providers`` names each transform's plugin for the fingerprint."""
        pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline([pipeline])
        options = dict(options or {})
        metas = source.metas()
        composition = compose(pipeline.steps, metas, on_collision=options.get("on_collision") or "error", carried=True)
        outputs = dict(composition.metas)  # every output, in write order (composition.ordered's)
        if any(meta.stored for meta in outputs.values()):
            for group in composition.ordered:
                for key, meta in group.outputs.items():
                    if meta.stored:
                        outputs[key] = _stored_only_if_carried(key, meta, group, metas)
        consumed, dropped = set(composition.consumed), set(composition.dropped) | set(composition.overwritten)
        dropped_only, overwritten = set(composition.dropped), set(composition.overwritten)
        return cls(
            source=source,
            pipeline=pipeline,
            groups=composition.ordered,
            outputs=outputs,
            lineage=composition.lineage,
            mapped=[k for k in metas if k in consumed and k not in dropped],
            unmapped=[k for k in metas if k not in consumed],
            dropped=[k for k in metas if k in dropped_only] if dropped_only else [],
            new=[k for k, lin in composition.lineage.items() if not lin.sources],
            collisions=composition.collisions,
            overwritten=[k for k in metas if k in overwritten] if overwritten else [],
            options=options,
            providers=dict(providers or {}),
        )

    # -- raw copies -------------------------------------------------------------
    def raw_spans(self, group: Group) -> dict[str, list[RawSpan]]:
        """The outputs of ``group`` that can be copied as raw bytes, each with where its bytes lie, in order.

        An output qualifies when the group declares its bytes as byte ranges of source tensors
        (``Group.pieces``: a rename, a concatenation along the first dimension, ...) and the
        source stores those tensors as plain bytes (safetensors, unquantized GGUF), or when it
        is a quantized tensor carried unchanged (its output meta keeps the ``stored`` type) and
        the target keeps stored types (:attr:`keeps_stored`): then its blocks are copied whole.
        """
        if not group.pieces:
            return {}
        found: dict[str, list[RawSpan]] = {}
        for key, pieces in group.pieces.items():
            if self.outputs[key].stored:
                # Plan.build kept ``stored`` only on a whole, unchanged copy of one source tensor
                span = self.source.stored_span(pieces[0].key) if self.keeps_stored else None
                if span is not None:
                    found[key] = [span]
                continue
            if len(pieces) == 1 and pieces[0].key == ZEROS:  # an all-zero tensor (Group.zeros)
                if pieces[0].length == group.outputs[key].nbytes:
                    found[key] = [RawSpan(None, 0, pieces[0].length)]
                continue
            if len(pieces) == 1 and pieces[0].offset == 0:  # a whole tensor, renamed: its own span, if it is all of it
                whole = self.source.raw_span(pieces[0].key)
                if whole is not None and whole.length == pieces[0].length == group.outputs[key].nbytes:
                    found[key] = [whole]
                    continue
            spans = []
            for piece in pieces:
                if piece.key == ZEROS:  # zero bytes, from no file (Group.zeros)
                    spans.append(RawSpan(None, 0, piece.length))
                    continue
                whole = self.source.raw_span(piece.key)
                if whole is None or piece.offset + piece.length > whole.length:
                    break
                spans.append(RawSpan(whole.path, whole.offset + piece.offset, piece.length))
            else:
                if sum(span.length for span in spans) == group.outputs[key].nbytes:
                    found[key] = spans
        return found

    def raw_offsets(self) -> dict[str, int]:
        """Where each output that can be copied as raw bytes starts in its source file."""
        return {key: spans[0].offset for group in self.groups for key, spans in self.raw_spans(group).items()
                if spans and spans[0].path is not None}

    # -- figures -----------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        metas = self.source.metas()
        return sum(metas[k].stored_nbytes for g in self.groups if g.outputs for k in g.inputs)

    @property
    def bytes_written(self) -> int:
        """Tensor bytes the target receives: quantized tensors at their stored size where it keeps them."""
        return sum(m.stored_nbytes if self.keeps_stored else m.nbytes for m in self.outputs.values())

    @property
    def largest_group_bytes(self) -> int:
        metas = self.source.metas()
        return max(
            (sum(metas[k].nbytes for k in g.inputs) + sum(m.nbytes for m in g.outputs.values()) for g in self.groups),
            default=0,
        )

    @property
    def fingerprint(self) -> str:
        """sha256 of the pipeline's canonical form (see :mod:`statebridge.planning.fingerprint`)."""
        from .fingerprint import fingerprint

        edits = self.folder.file_edits if self.folder else {}
        others = {name: made for name, made in edits.items() if name != CONFIG}
        return fingerprint(self.pipeline, self.providers, edits.get(CONFIG), self.options.get("metadata"), others)

    @property
    def changed(self) -> dict[str, tuple[str, ...]]:
        """Target keys whose values or names some step changed, with the operations."""
        return {k: lin.ops for k, lin in self.lineage.items() if lin.ops}

    def counts(self) -> dict[str, int]:
        return {
            "source tensors": len(self.source.metas()),
            "target tensors": len(self.outputs),
            "groups": len(self.groups),
            "mapped": len(self.mapped),
            "unmapped": len(self.unmapped),
            "dropped": len(self.dropped),
            "new": len(self.new),
            **({"overwritten": len(self.overwritten)} if self.overwritten else {}),
        }

    def render(self, verbose: bool = False) -> str:
        """A human-readable account of the plan (what ``statebridge plan`` prints)."""
        lines = [f"plan for {self.source.name}: {len(self.pipeline.steps)} steps, fingerprint {self.fingerprint[:16]}"]
        lines.append("  " + ", ".join(f"{v} {k}" for k, v in self.counts().items()))
        lines.append(
            f"  reads {human_bytes(self.bytes_read)}, writes {human_bytes(self.bytes_written)}, largest group {human_bytes(self.largest_group_bytes)}"
        )
        if self.estimate is not None:
            lines.append(self.estimate.render(verbose))
        lines.extend(_section("dropped", self.dropped))
        lines.extend(_section("new", self.new))
        ops: dict[str, list[str]] = {}
        for key, key_ops in self.changed.items():
            ops.setdefault(" -> ".join(key_ops), []).append(key)
        if ops:
            lines.append("  changes:")
            for op, keys in ops.items():
                lines.append(f"    {op}:")
                lines.extend(f"      {k}" for k in (keys if verbose else compress_keys(keys)))
        if self.unmapped:
            lines.extend(_section("unchanged (no step touched them)", self.unmapped, verbose))
        stored: dict[str, int] = {}
        for meta in self.outputs.values():
            if meta.stored and not meta.encode:
                stored[meta.stored] = stored.get(meta.stored, 0) + 1
        if stored:
            how = {
                True: "copied as their stored blocks",
                False: "dequantized to float32 on writing",
                None: "kept as stored blocks by a GGUF target, dequantized to float32 by others",
            }[self.keeps_stored]
            lines.append(f"  quantized, {how}: " + ", ".join(f"{n} {t}" for t, n in sorted(stored.items())))
        if self.folder is not None:
            lines.extend(self.folder.render())
        for finding in self.findings:
            lines.append(f"  {finding}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable plan (``statebridge plan --json``)."""
        return {
            "source": self.source.name,
            "fingerprint": self.fingerprint,
            "counts": self.counts(),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "largest_group_bytes": self.largest_group_bytes,
            "groups": [
                # self.outputs: a step that changed a quantized tensor's values no longer stores it as blocks
                {"inputs": list(g.inputs), "outputs": {k: str(self.outputs.get(k, m)) for k, m in g.outputs.items()}, "ops": list(g.ops)}
                for g in self.groups
            ],
            "dropped": self.dropped,
            "new": self.new,
            "unmapped": self.unmapped,
            "findings": [str(f) for f in self.findings],
            "estimate": self.estimate.to_dict() if self.estimate is not None else None,
            "model_folder": self.folder.to_dict() if self.folder is not None else None,
        }


def _stored_only_if_carried(key: str, meta: TensorMeta, group: Group, metas: Mapping[str, TensorMeta]) -> TensorMeta:
    """``meta``, without its ``stored`` type unless its group copies one source tensor of that type whole.

    A step that passes its input's meta along but changes the values (a scale, say)
    computes the output in float: it must not claim the source's blocks.
    """
    if not meta.stored or meta.encode:  # a type a step asked for (quantize) is written whatever made the values
        return meta
    pieces = group.pieces.get(key) if group.pieces else None
    if pieces and len(pieces) == 1:
        piece = pieces[0]
        source = metas.get(piece.key)
        if source is not None and source.stored == meta.stored and piece.offset == 0 and piece.length == source.nbytes:
            return meta
    return TensorMeta(meta.shape, meta.dtype)


def _section(title: str, keys: list[str], verbose: bool = True) -> list[str]:
    if not keys:
        return []
    shown = keys if verbose else compress_keys(keys)
    return [f"  {title} ({len(keys)}):", *(f"    {k}" for k in shown)]
