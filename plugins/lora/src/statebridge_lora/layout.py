"""``lora_layout``: between a standard checkpoint and one whose layers carry their own LoRA tensors.

Some training code (the "universal checkpoint" seed of issue 10) wraps a layer ``X`` as
``X.main_weight`` (the frozen base ``nn.Linear``) plus ``X.lora_A`` (``r × in``) and
``X.lora_B`` (``out × r``), and computes ``main(x) + lora_B(lora_A(x)) · alpha/r``.

``direction: standardize`` gives the plain model's checkpoint: ``X.weight = W_main + (B·A)·alpha/r``
(float32, one rounding into the weight's dtype), ``X.main_weight.bias`` becomes ``X.bias``,
the LoRA tensors are consumed by the merge; a layer without LoRA tensors is only renamed
(its bytes copied).  ``direction: wrap`` goes the other way for the weights ``targets``
names: ``X.weight`` becomes ``X.main_weight.weight`` (bytes copied), ``X.bias`` becomes
``X.main_weight.bias``, and new ``X.lora_A.weight`` (Kaiming-uniform with ``a=sqrt(5)``, as
PEFT and ``nn.Linear`` initialise it, from a generator seeded by ``seed`` and the key) and
``X.lora_B.weight`` (zeros) at ``rank`` are added, so the wrapped model computes exactly
what the plain one did.  A rank change is the two in turn: standardize at the old rank,
wrap at the new one.  The sub-module names are parameters (``main``, ``a``, ``b``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

import statebridge as sb

if TYPE_CHECKING:
    import torch


class LoraLayout(sb.Transform):
    """Standardize ``X.main_weight`` + ``X.lora_A/B`` into ``X.weight``, or wrap ``X.weight`` with new LoRA tensors."""

    name = "lora_layout"

    class Params(sb.Params):
        direction: Literal["standardize", "wrap"]
        alpha: float | None = None  # standardize: the scale is alpha / r
        targets: list[str] = Field(default_factory=list)  # wrap: patterns of the weights to wrap
        rank: int | None = Field(None, ge=1)  # wrap
        seed: int = 0
        main: str = "main_weight"
        a: str = "lora_A"
        b: str = "lora_B"
        strict: bool = True

        @model_validator(mode="after")
        def _complete(self) -> "LoraLayout.Params":
            if self.direction == "wrap" and (not self.targets or self.rank is None):
                raise ValueError("wrap needs 'targets' (patterns of the weights to wrap) and 'rank'")
            if self.direction == "standardize" and (self.targets or self.rank is not None):
                raise ValueError("standardize takes no 'targets' or 'rank' (it finds every main_weight)")
            return self

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        return self._standardize(metas) if self.params.direction == "standardize" else self._wrap(metas)

    def _standardize(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        p = self.params
        main, lora = f".{p.main}.", (f".{p.a}.weight", f".{p.b}.weight")
        modules = {k[: -len(f"{main}weight")] for k in metas if k.endswith(f"{main}weight")}
        orphans = [k for k in metas for suffix in lora if k.endswith(suffix) and k[: -len(suffix)] not in modules]
        if orphans:
            raise sb.PlanError(f"LoRA tensors without a {p.main}.weight beside them: {', '.join(orphans[:5])}")
        if not modules and p.strict:
            raise sb.PlanError(f"no '*{main}weight' key: nothing to standardize (strict: false allows it)")
        groups = []
        for key in metas:
            if main not in key:
                continue
            module, _, rest = key.rpartition(main)
            if module not in modules or "." in rest:
                continue
            target = f"{module}.{rest}"
            if target in metas:
                raise sb.PlanError(f"{key!r} would become {target!r}, which the checkpoint already has")
            a_key, b_key = f"{module}{lora[0]}", f"{module}{lora[1]}"
            if rest != "weight" or (a_key not in metas and b_key not in metas):
                groups.append(sb.Group.rename(key, target, metas[key], "lora_layout(standardize)"))
                continue
            if a_key not in metas or b_key not in metas:
                raise sb.PlanError(f"{module!r} has {a_key if a_key in metas else b_key!r} but not the other LoRA matrix")
            groups.append(self._merge_group(key, target, a_key, b_key, metas))
        return groups

    def _merge_group(self, key: str, target: str, a_key: str, b_key: str, metas: Mapping[str, sb.TensorMeta]) -> sb.Group:
        meta, a, b = metas[key], metas[a_key], metas[b_key]
        if len(meta.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] \
                or (b.shape[0], a.shape[1]) != tuple(meta.shape):
            raise sb.PlanError(f"{a_key!r} {list(a.shape)} and {b_key!r} {list(b.shape)} do not fit {key!r} {list(meta.shape)}")
        if self.params.alpha is None:
            raise sb.PlanError(f"{key!r} has LoRA tensors: give 'alpha' (their scale is alpha / r)")
        scale = self.params.alpha / a.shape[0]

        def compute(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            w = t[key]
            return {target: (w.float() + (t[b_key].float() @ t[a_key].float()) * scale).to(w.dtype)}

        return sb.Group(inputs=(key, a_key, b_key), outputs={target: meta}, compute=compute,
                        ops=(f"lora_layout(standardize: W + B·A·{scale:g})",), effort=2 + a.shape[0] / 4)

    def _wrap(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        p = self.params
        keys = list(dict.fromkeys(k for pattern in p.targets for k in sb.select(pattern, metas, p.strict)))
        groups = []
        for key in keys:
            meta = metas[key]
            if not key.endswith(".weight") or len(meta.shape) != 2 or not meta.dtype.is_floating_point:
                raise sb.PlanError(f"{key!r} ({meta}) is not the 2-D floating-point weight of a layer; wrap wraps those")
            module = key[: -len(".weight")]
            new = {f"{module}.{p.main}.weight": key}
            if f"{module}.bias" in metas:
                new[f"{module}.{p.main}.bias"] = f"{module}.bias"
            for target, source in new.items():
                if target in metas:
                    raise sb.PlanError(f"{source!r} would become {target!r}, which the checkpoint already has")
                groups.append(sb.Group.rename(source, target, metas[source], "lora_layout(wrap)"))
            out_f, in_f = meta.shape
            a_key, b_key = f"{module}.{p.a}.weight", f"{module}.{p.b}.weight"
            outputs = {a_key: sb.TensorMeta((p.rank, in_f), meta.dtype), b_key: sb.TensorMeta((out_f, p.rank), meta.dtype)}
            groups.append(sb.Group(inputs=(), outputs=outputs, compute=self._init(a_key, b_key, outputs),
                                   ops=(f"lora_layout(wrap: new rank {p.rank}, seed {p.seed})",)))
        return groups

    def _init(self, a_key: str, b_key: str, outputs: Mapping[str, sb.TensorMeta]) -> Callable[[dict], dict]:
        seed = self.params.seed * 1_000_003 + zlib.crc32(a_key.encode())

        def compute(_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            import torch

            a = torch.empty(outputs[a_key].shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
            return {a_key: a.to(outputs[a_key].dtype.torch), b_key: torch.zeros(outputs[b_key].shape, dtype=outputs[b_key].dtype.torch)}

        return compute
