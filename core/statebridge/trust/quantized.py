"""Tensor types meeting the target: quantized ones kept as their blocks, dequantized or encoded, and the plan says which."""

from __future__ import annotations

from ..errors import ConfigError
from ..planning.plan import Plan
from ..tensors.meta import TensorMeta, dtype_name
from ..tensors.patterns import describe_keys
from ..transforms.base import Carry
from ..writers.base import Writer
from .findings import Finding

CHECK = "plan.quantized"
#: the check that lists every tensor whose type a step changed
TYPES_CHECK = "plan.types"


def type_name(meta: TensorMeta) -> str:
    """The type a tensor is held in, by GGML's name where it has one (``Q4_K``, ``F32``, ``BF16``, ``I64``)."""
    return meta.stored or meta.dtype.code or dtype_name(meta.dtype)


def type_changes(plan: Plan) -> list[Finding]:
    """One info finding per type change the steps make (``Q6_K -> Q8_0``, ``F32 -> BF16``), naming the keys.

    A change is an output made from one source tensor whose type (stored type, else
    dtype) differs from that source's: a ``quantize`` or ``cast`` asked for it, or a step
    computed the values of a quantized tensor, which are then written in float.  Run by the
    core's ``validate_plan``, so ``statebridge plan`` lists them with or without a target.
    """
    metas = plan.source.metas()
    changes: dict[tuple[str, str], list[str]] = {}
    for group in plan.groups:
        if type(group.compute) is Carry:  # a tensor carried or renamed keeps its meta, and its type
            continue
        for key in group.outputs:
            meta = plan.outputs[key]
            sources = plan.lineage[key].sources if key in plan.lineage else ()
            if len(sources) != 1:
                continue
            source = metas.get(sources[0])
            if source is None or source is meta:
                continue
            before, after = type_name(source), type_name(meta)
            if before != after:
                changes.setdefault((before, after), []).append(key)
    return [
        Finding("info", f"type change {before} -> {after}: {len(keys)} tensors, {describe_keys(keys)}", TYPES_CHECK)
        for (before, after), keys in changes.items()
    ]


def fit_types(plan: Plan, writer: Writer) -> None:
    """Tell ``plan`` whether ``writer`` keeps quantized tensors in their stored type, and say so as findings.

    A writer that stores quantized types (``stores_quantized``: GGUF) gets the carried
    ones as their raw blocks, encodes the ones a ``quantize`` step asked for, and is
    told which outputs were computed in float from quantized inputs
    (``writer.dequantized``: its ``general.file_type`` then no longer describes the
    file); any other format gets carried ones dequantized to float32, with an info
    finding counting them, and refuses a ``quantize`` to a block type here, before any
    work: the format has no such type, and dequantizing what the config asked to
    quantize would silently do the opposite.
    """
    encoded = {key: meta.stored for key, meta in plan.outputs.items() if meta.encode}
    if encoded and not writer.stores_quantized:
        types, keys = sorted(set(encoded.values())), list(encoded)
        raise ConfigError(
            f"quantize: {writer.format} has no {', '.join(types)} type ({len(keys)} tensors, e.g. {keys[0]!r}); "
            "write a .gguf target, or quantize to F16, BF16 or F32"
        )
    plan.keeps_stored = writer.stores_quantized
    plan.findings = [f for f in plan.findings if f.check != CHECK]  # a plan may meet its writer twice
    metas = plan.source.metas()
    carried = {key: meta.stored for key, meta in plan.outputs.items() if meta.stored and not meta.encode}
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
        dtypes = ", ".join(sorted({dtype_name(plan.outputs[key].dtype) for key in computed}))
        plan.findings.append(Finding(
            "info",
            f"{len(computed)} tensors computed from quantized inputs are written in {dtypes}, e.g. {computed[0]!r}",
            CHECK,
        ))
    if plan.keeps_stored:
        writer.dequantized = computed  # type: ignore[attr-defined]  # only writers that store quantized types read it
