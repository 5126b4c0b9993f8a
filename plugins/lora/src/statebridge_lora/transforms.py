"""The ``lora_merge`` transform: fold PEFT LoRA adapters into a base checkpoint, group by group.

The plan is built from headers: the base's metas, each adapter's ``adapter_config.json``
and the header of its weights file.  Each adapted module is one group (its base weight in,
the merged weight out, same name, shape and dtype); a replaced tensor (``modules_to_save``)
is one group too; every other tensor is untouched and the core copies its bytes.  The
groups' ``compute`` reads the adapter's few small tensors through statebridge's own readers
and applies PEFT's arithmetic (:mod:`statebridge_lora.merge`), recording a
:class:`MergeRecord` per tensor for the merge report.

Config form::

    - lora_merge: {adapter: path/to/adapter}
    - lora_merge: {adapters: [{path: a, weight: 0.7}, {path: b, weight: 0.3}], combination: cat}
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

import statebridge as sb

from .adapter import Adapter, LoraModule, open_adapter

if TYPE_CHECKING:
    import torch

    from .merge import Factors, Measures


class AdapterRef(sb.Params):
    """One adapter of several: its folder and its weight in the combination."""

    path: sb.PathParam
    weight: float = 1.0


@dataclass(frozen=True)
class MergeRecord:
    """What merging did to one tensor, for the merge report.

    ``change`` is ‖ΔW‖/‖W‖ (float32; ΔW is PEFT's delta for one plain LoRA adapter, else
    merged − W); ``rounding`` is ‖exact − merged‖/‖exact‖, the
    relative error of the cast of the float32 result back to the base dtype (0 for a float32
    base), ``max_rounding`` its largest element; ``zero_norm_rows`` counts DoRA rows whose
    norm was zero (PEFT writes NaN there; they are kept as they are, zero).
    """

    key: str
    how: str
    change: float
    rounding: float
    max_rounding: float
    zero_norm_rows: int = 0


class LoraMerge(sb.Transform):
    """Merge PEFT LoRA adapters into the base weights, bit for bit as PEFT's ``merge_and_unload``.

    ``adapter`` names one adapter folder; ``adapters`` several, each with a weight, combined
    as PEFT's ``add_weighted_adapter`` does (``combination``: ``cat``, exact, the default;
    ``linear``, PEFT's approximate one) or merged one after another (``sequential``, as
    ``merge_and_unload`` does with several adapters loaded, each scaled by its weight as
    ``set_scale`` does).  A single adapter's weight scales it like ``set_scale``.
    ``safe_merge`` follows PEFT's ``safe_merge=True`` arithmetic and refuses non-finite results.
    """

    name = "lora_merge"

    class Params(sb.Params):
        adapter: sb.PathParam | None = None
        adapters: list[AdapterRef] | None = None
        combination: Literal["cat", "linear", "sequential"] = "cat"
        safe_merge: bool = False
        report: bool = True  # measure each merged tensor for the merge report (taken on the way for plain LoRA into half precision)

        @model_validator(mode="after")
        def _one_source(self) -> "LoraMerge.Params":
            if (self.adapter is None) == (self.adapters is None):
                raise ValueError("give either 'adapter' (a PEFT adapter folder) or 'adapters' ([{path, weight}, ...])")
            if self.adapters is not None and not self.adapters:
                raise ValueError("'adapters' is empty")
            return self

    def __init__(self, params: Any = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        #: merged key -> what merging did to it, filled as groups are computed (threads: one entry each)
        self.records: dict[str, MergeRecord] = {}
        self._local = threading.local()  # each thread's float32 workspace for ΔW (:meth:`_workspace`)

    def refs(self) -> list[AdapterRef]:
        p = self.params
        return [AdapterRef(path=p.adapter)] if p.adapter is not None else list(p.adapters)

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        refs = self.refs()
        adapters = [open_adapter(ref.path) for ref in refs]
        self._check_combination(adapters)
        self.records = {}
        by_module: dict[str, list[tuple[int, LoraModule]]] = {}
        replaced: dict[str, tuple[int, str]] = {}
        for i, adapter in enumerate(adapters):
            for name, module in adapter.modules.items():
                by_module.setdefault(module.base_key, []).append((i, module))
            for key, adapter_key in adapter.replaced.items():
                # a base layer several adapters saved (PEFT's save_embedding_layers): the last one loaded wins, as in PEFT
                if key in replaced and not (".base_layer." in adapter_key and ".base_layer." in replaced[key][1]):
                    raise sb.PlanError(f"{key!r} is replaced by two adapters ({refs[replaced[key][0]].path} and {refs[i].path}); "
                                       "PEFT cannot combine modules_to_save either")
                replaced[key] = (i, adapter_key)
        missing = sorted({k for k in by_module if k not in metas} | {k for k in replaced if k not in metas})
        if missing:
            raise sb.PlanError(f"adapter modules that match no base tensor: {', '.join(missing[:8])}"
                               + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                               + f" (the base has e.g. {next(iter(metas), 'nothing')!r})")
        groups = []
        for key in metas:  # base order: the executor reads the base front to back
            if key in by_module:
                groups.append(self._merge_group(key, metas[key], by_module[key], adapters, replaced.get(key)))
                for i, module in by_module[key]:
                    if module.bias is not None:
                        groups.append(self._bias_group(module, metas, adapters[i]))
            elif key in replaced:
                groups.append(self._replace_group(key, metas[key], adapters[replaced[key][0]], replaced[key][1]))
        return groups

    def _check_combination(self, adapters: list[Adapter]) -> None:
        """Refuse, before any data is read, what PEFT cannot combine (or we would not combine as PEFT does)."""
        if len(adapters) < 2:
            return
        names = [str(a.path) for a in adapters]
        for adapter in adapters:
            if adapter.use_dora and self.params.combination != "sequential":
                raise sb.PlanError(f"adapter {str(adapter.path)!r} is DoRA: PEFT's add_weighted_adapter does not combine "
                                   "DoRA magnitudes; use combination: sequential")
            if any(m.bias for m in adapter.modules.values()):
                raise sb.PlanError(f"adapter {str(adapter.path)!r} has lora_bias: merge it in its own lora_merge step")
        if len({a.config.get("fan_in_fan_out", False) for a in adapters}) > 1:
            raise sb.PlanError(f"the adapters {', '.join(names)} disagree on fan_in_fan_out")
        if self.params.combination == "linear" and len({a.max_rank for a in adapters}) > 1:
            ranks = ", ".join(f"{n}: r={a.max_rank}" for n, a in zip(names, adapters))
            raise sb.PlanError(f"combination 'linear' needs adapters of one rank ({ranks}); use 'cat'")

    def _merge_group(
        self, key: str, meta: sb.TensorMeta, found: list[tuple[int, LoraModule]], adapters: list[Adapter],
        replacement: tuple[int, str] | None,
    ) -> sb.Group:
        if not meta.dtype.is_floating_point:
            raise sb.PlanError(f"{key!r} ({meta}) is not floating point; a LoRA adapter cannot be merged into it")
        for i, module in found:
            check_shapes(module, adapters[i], key, meta)
        rank = max(m.r for _, m in found)
        what = ", ".join(f"{Path(adapters[i].path).name} r={m.r} s={m.scaling:g}" + (" dora" if m.magnitude else "")
                         for i, m in found)
        return sb.Group(
            inputs=(key,), outputs={key: meta}, compute=self._merge_fn(key, found, adapters, replacement),
            ops=(f"lora_merge({what})",), effort=2 + rank / 4,
        )

    def _merge_fn(
        self, key: str, found: list[tuple[int, LoraModule]], adapters: list[Adapter], replacement: tuple[int, str] | None
    ) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        refs, p = self.refs(), self.params
        rank = sum(a.max_rank for a in adapters) if p.combination == "cat" else adapters[0].max_rank
        rslora = adapters[0].use_rslora

        def compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            import torch

            from . import merge

            weight = tensors[key]
            if replacement is not None:  # the adapter saved this base layer (an embedding): PEFT loads it over the base's
                weight = adapters[replacement[0]].load([replacement[1]])[replacement[1]].to(weight.dtype)
            parts = [(factors(adapters[i], module, refs[i].weight, sequential=len(adapters) == 1 or p.combination == "sequential"),
                      refs[i].weight) for i, module in found]
            if len(adapters) > 1 and p.combination != "sequential":
                combine = merge.combine_cat if p.combination == "cat" else merge.combine_linear
                parts = [(combine(parts, rank, rslora), 1.0)]
            how = "dora" if any(f.magnitude is not None for f, _ in parts) else "lora"
            if len(parts) == 1:
                step = merge.merge_one(weight, parts[0][0], p.safe_merge, keep_exact=p.report,
                                       workspace=self._workspace(weight.numel()))
                out, exact, update_norm, zero_rows, measures = step.out, step.exact, step.update_norm, step.zero_rows, step.measures
            else:  # sequential: PEFT's unmerges and merges, in its order; |dW| is measured on the result
                layer = merge.Layer(weight, {str(i): f for i, (f, _) in enumerate(parts)}, p.safe_merge)
                layer.merge([str(i) for i in range(len(parts))])
                rounds = weight.dtype not in (torch.float32, torch.float64)
                out, exact, update_norm, zero_rows, measures = layer.weight, layer.exact if rounds else None, None, layer.zero_rows, None
            if p.safe_merge and not torch.isfinite(out).all():
                raise sb.ExecutionError(f"{key!r}: the merged weight has NaN or infinite values (safe_merge)")
            if p.report:
                self.records[key] = (measured(key, how, measures) if measures is not None
                                     else record(key, how, weight, out, exact, update_norm, zero_rows))
            return {key: out}

        return compute

    def _workspace(self, numel: int) -> torch.Tensor:
        """This thread's float32 buffer for ΔW, grown to ``numel`` elements and reused from group to group.

        A fresh float32 ΔW per group would be faulted in and zeroed by the kernel page by
        page, 4.9 GB of it for a 2.5 GB float16 model; the buffer costs the largest weight's
        float32 size per thread for as long as this step lives.
        """
        import torch

        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < numel:
            self._local.buffer = None  # the old one goes before the larger one comes
            self._local.buffer = buffer = torch.empty(numel, dtype=torch.float32)
        return buffer

    def _bias_group(self, module: LoraModule, metas: Mapping[str, sb.TensorMeta], adapter: Adapter) -> sb.Group:
        key = f"{module.name}.bias"
        if key not in metas:
            raise sb.PlanError(f"module {module.name!r} has a lora_B bias but the base has no {key!r} to merge it into")
        safe = self.params.safe_merge

        def compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            from . import merge

            f = factors(adapter, module, 1.0, sequential=True)
            return {key: merge.merge_bias(tensors[key], f, safe)}

        return sb.Group(inputs=(key,), outputs={key: metas[key]}, compute=compute, ops=(f"lora_merge(bias, s={module.scaling:g})",))

    def _replace_group(self, key: str, meta: sb.TensorMeta, adapter: Adapter, adapter_key: str) -> sb.Group:
        saved = adapter.metas[adapter_key]
        if saved.shape != meta.shape:
            raise sb.PlanError(f"{key!r} is {list(meta.shape)} in the base but the adapter saved {adapter_key!r} "
                               f"as {list(saved.shape)}")

        def compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = adapter.load([adapter_key])[adapter_key].to(tensors[key].dtype)
            if self.params.report:
                self.records[key] = record(key, "replaced", tensors[key], out, None)
            return {key: out}

        return sb.Group(inputs=(key,), outputs={key: meta}, compute=compute,
                        ops=(f"lora_merge(replaced by {Path(adapter.path).name}: {adapter_key})",))

    def report(self) -> sb.Report:
        """The merge report: per tensor ‖ΔW‖/‖W‖, the rounding error of the cast back, DoRA's zero-norm rows."""
        rows = [[r.key, r.how, f"{r.change:.3e}", f"{r.rounding:.3e}", f"{r.max_rounding:.3e}", r.zero_norm_rows]
                for r in sorted(self.records.values(), key=lambda r: r.key)]
        notes = []
        zero = sum(r.zero_norm_rows for r in self.records.values())
        if zero:
            notes.append(f"{zero} DoRA rows had zero norm (PEFT would write NaN there); they were left at zero")
        return sb.Report(
            "lora_merge report", ["tensor", "merge", "|dW|/|W|", "cast error (rel)", "cast error (max)", "zero-norm rows"],
            rows, notes, {"records": [r.__dict__ for r in sorted(self.records.values(), key=lambda r: r.key)]},
        )


def check_shapes(module: LoraModule, adapter: Adapter, key: str, meta: sb.TensorMeta) -> None:
    """Refuse, naming both, an adapter module whose matrices do not fit its base weight."""
    a, b = adapter.metas[module.a].shape, adapter.metas[module.b].shape
    base = meta.shape
    if module.kind == "embedding":
        expected: tuple[int, ...] = (a[1], b[0]) if len(a) == 2 and len(b) == 2 else ()
    elif len(base) == 2:
        expected = (b[0], a[1]) if len(a) == 2 and len(b) == 2 else ()
        expected = expected[::-1] if module.fan_in_fan_out else expected
    elif len(base) in (3, 4):
        expected = (b[0], *a[1:]) if len(a) == len(base) else ()
    else:
        raise sb.PlanError(f"{key!r} is {list(base)}: statebridge-lora merges Linear, Embedding, Conv1d and Conv2d weights")
    if tuple(base) != tuple(expected):
        hint = ""
        if len(base) == 2 and module.kind == "linear" and tuple(base) == tuple(expected[::-1]):
            hint = f" (fan_in_fan_out is {module.fan_in_fan_out}; a GPT-2 Conv1D base needs it true)"
        raise sb.PlanError(f"module {module.name!r}: lora_A {list(a)} and lora_B {list(b)} do not fit "
                           f"{key!r} {list(base)}{hint}")
    if module.magnitude is not None and adapter.metas[module.magnitude].numel != b[0]:
        raise sb.PlanError(f"module {module.name!r}: lora_magnitude_vector has {adapter.metas[module.magnitude].numel} "
                           f"values for {b[0]} output features")


def factors(adapter: Adapter, module: LoraModule, weight: float, sequential: bool) -> Factors:
    """``module``'s matrices as PEFT holds them (float32), scaled as ``set_scale(weight)`` would when ``sequential``."""
    import math

    from .merge import Factors, upcast

    keys = [k for k in (module.a, module.b, module.magnitude, module.bias) if k is not None]
    t = {k: upcast(v) for k, v in adapter.load(keys).items()}
    scaling = module.scaling
    if sequential and weight != 1.0:
        scaling = weight * module.alpha / (math.sqrt(module.r) if adapter.use_rslora else module.r)
    return Factors(
        module, t[module.a], t[module.b], scaling,
        t[module.magnitude] if module.magnitude else None, t[module.bias] if module.bias else None,
    )


#: elements per block where the report forms a difference (a block of rows at a time)
BLOCK = 1 << 20


def measured(key: str, how: str, m: Measures) -> MergeRecord:
    """The :class:`MergeRecord` of a merge that took its own measures (plain LoRA into a half-precision weight)."""
    return MergeRecord(
        key=key, how=how,
        change=m.update ** 0.5 / m.base ** 0.5 if m.base else (float("inf") if m.update else 0.0),
        rounding=m.error ** 0.5 / m.exact ** 0.5 if m.exact else 0.0, max_rounding=m.worst,
    )


def record(key: str, how: str, base: torch.Tensor, out: torch.Tensor, exact: torch.Tensor | None,
           update_norm: float | None = None, zero_rows: int = 0) -> MergeRecord:
    """The :class:`MergeRecord` of ``key``: ‖ΔW‖/‖W‖ and the rounding of ``exact`` into ``out``.

    ‖ΔW‖ is ``update_norm`` (plain LoRA: of PEFT's float32 delta) or else ‖out − base‖; ``exact`` is the
    float32 result of the last merge before its cast (None where nothing was rounded: a
    float32 or float64 base, a tensor copied from the adapter).  Norms are float32, taken a
    block of rows at a time where a difference must be formed, so the report costs a few
    blocks of memory, and some passes over the tensor after the merge.  The common case,
    plain LoRA into a half-precision Linear weight, does not come here: its merge measures
    on the way (:func:`~statebridge_lora.merge.add_rounded`, :func:`measured`).
    """
    import torch

    def norm(t: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(t, dtype=torch.float32))

    def blocks(t: torch.Tensor) -> list[torch.Tensor]:
        flat = t.reshape(-1) if t.dim() < 2 else t
        step = max(1, BLOCK // max(1, flat[0].numel())) if flat.dim() > 1 else BLOCK
        return list(flat.split(step)) if flat.numel() else []

    base_norm = norm(base)
    if update_norm is not None:
        change = update_norm
    else:
        change = sum(norm(o.float() - w.float()) ** 2 for o, w in zip(blocks(out), blocks(base))) ** 0.5
    rounding = worst = 0.0
    if exact is not None:
        squares = 0.0
        for x, o in zip(blocks(exact), blocks(out)):
            err = o.to(torch.float32, copy=True).sub_(x)  # out - exact: half the time of x - o.float()
            squares += norm(err) ** 2
            low, high = torch.aminmax(err)
            worst = max(worst, -float(low), float(high))
        exact_norm = norm(exact)
        rounding = squares ** 0.5 / exact_norm if exact_norm else 0.0
    return MergeRecord(
        key=key, how=how,
        change=change / base_norm if base_norm else (float("inf") if change else 0.0),
        rounding=rounding, max_rounding=worst, zero_norm_rows=zero_rows,
    )
