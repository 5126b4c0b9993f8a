"""The PyTorch runtime: SeedΔ tensors as ``nn.Module`` layers, and their swap into a ``transformers`` model.

``open_layers(path)`` reads a SeedΔ GGUF (a model with its SeedΔ tensors, or a sidecar) and
returns ``{weight name: SeedDeltaLinear}``. A layer computes ``y = s ⊙ (B x + Δ x)``: the
xor-circulant base by FWHT (:func:`.xorc.apply`), the low-rank base as ``U (V x)``, the
residual as a sparse CSR product, ``s`` the row scale. ``reconstruct()`` gives the dense
``Ŵ``. The NaN/Inf guard: an output with a non-finite value is recomputed with the dense
weight when the file (or ``dense=``) still has it, once per layer with a warning; without one,
it raises, naming the weight. This is how a file is checked against its report.

This module imports torch at import time; the plugin's entry point never imports it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from statebridge import ConfigError, ExecutionError

from . import names, residual, storage, xorc


class SeedDeltaLinear(torch.nn.Module):
    """``y = s ⊙ (B x + Δ x) (+ bias)`` for one weight; float32 compute."""

    def __init__(self, weight: str, entry: storage.Entry, tensors: Mapping[str, torch.Tensor],
                 dense: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        import torch

        super().__init__()
        self.weight_name, self.entry = weight, entry
        self.in_features, self.out_features = entry.in_features, entry.out_features
        get = lambda part: tensors.get(names.sd_name(weight, part))  # noqa: E731
        idx, val = get("idx"), get("val")
        if idx is None or val is None:
            raise ConfigError(f"{weight}: the file has no {names.sd_name(weight, 'idx')} / {names.sd_name(weight, 'val')}")
        self.register_buffer("idx", idx.long())
        self.register_buffer("val", val.float())
        rs = get("rs")
        self.register_buffer("row_scale", None if rs is None else rs.float())
        self.terms: list[xorc.XorTerm] = []
        if entry.base == "xor_circulant":
            self.terms = storage.xor_terms(get("xc"), get("xr"), get("xs"))
        lu, lv = get("lu"), get("lv")
        self.register_buffer("u", None if lu is None else lu.float())
        self.register_buffer("v", None if lv is None else lv.float())
        self.register_buffer("dense", None if dense is None else dense.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        rows = self.idx if entry.scheme == "coo" else self.idx.repeat_interleave(entry.block, 0)[: self.out_features]
        self._delta = residual.csr(rows, self.val, self.in_features, check=True)
        self._warned = False

    def _compute(self, flat: torch.Tensor) -> torch.Tensor:
        y = (self._delta @ flat.T).T
        if self.terms:
            y = y + xorc.apply(self.terms, flat, self.out_features)
        if self.u is not None:
            y = y + (flat @ self.v.T) @ self.u.T
        if self.row_scale is not None:
            y = y * self.row_scale
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, self.in_features).float()
        y = self._compute(flat)
        if not bool(torch.isfinite(y).all()):
            if self.dense is None:
                raise ExecutionError(f"{self.weight_name}: the SeedΔ layer gave NaN/Inf and the file has no dense weight "
                                     "to fall back to")
            if not self._warned:
                warnings.warn(f"{self.weight_name}: SeedΔ output not finite; using the dense weight", RuntimeWarning,
                              stacklevel=2)
                self._warned = True
            y = flat @ self.dense.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def reconstruct(self) -> torch.Tensor:
        """The dense ``Ŵ`` ``(out, in)`` float32 this layer applies."""
        import torch

        w = self._delta.to_dense()
        if self.terms:
            w = w + xorc.dense(self.terms, self.out_features, self.in_features)
        if self.u is not None:
            w = w + self.u @ self.v
        if self.row_scale is not None:
            w = w * self.row_scale.unsqueeze(1)
        return w

    def extra_repr(self) -> str:
        e = self.entry
        return f"{self.weight_name}: {e.out_features}x{e.in_features}, base={e.base}, {e.scheme} K={e.K}"


def open_layers(path: str | os.PathLike[str], *, dense: str | os.PathLike[str] | None = None) -> dict[str, SeedDeltaLinear]:
    """``{weight name: SeedDeltaLinear}`` of a SeedΔ GGUF; ``dense``: the model file beside a sidecar, for the guard."""
    from statebridge.readers.gguf import GGUFSource

    src = GGUFSource(Path(path))
    fields = {k: f.value for k, f in src.typed_fields.items() if k.startswith(storage.PREFIX)}
    entries = storage.read_entries(fields, str(path))
    others = GGUFSource(Path(dense)) if dense is not None else None
    layers = {}
    try:
        for entry in entries:
            parts = {k: src.load(k) for k in (names.sd_name(entry.weight, p) for p in names.SUFFIXES) if k in src.metas()}
            full = None
            for s in (src, others):
                if s is not None and entry.weight in s.metas():
                    full = s.load(entry.weight).float().clone()
                    break
            layers[entry.weight] = SeedDeltaLinear(entry.weight, entry, {k: v.clone() for k, v in parts.items()}, full)
    finally:
        src.close()
        if others is not None:
            others.close()
    return layers


def swap_into(model: Any, layers: Mapping[str, SeedDeltaLinear]) -> list[str]:
    """Replace the ``nn.Linear`` of each weight (GGUF or HF name) in a ``transformers`` model; the module names swapped."""
    import torch

    modules = dict(model.named_modules())
    swapped = []
    for weight, layer in layers.items():
        where = names.classify(weight)
        if where is None:
            raise ConfigError(f"{weight}: not an FFN weight name this helper can place")
        suffix = names.hf_name(*where).removeprefix("model.").removesuffix(".weight")
        found = [m for m in modules if m == suffix or m.endswith("." + suffix)]
        if len(found) != 1:
            raise ConfigError(f"{weight}: {len(found)} modules of the model end with {suffix!r}")
        parent_name, _, child = found[0].rpartition(".")
        old = modules[found[0]]
        if not isinstance(old, torch.nn.Linear) or tuple(old.weight.shape) != (layer.out_features, layer.in_features):
            raise ConfigError(f"{weight}: module {found[0]} is not a {layer.out_features}x{layer.in_features} Linear")
        if old.bias is not None and layer.bias is None:
            layer.bias = old.bias.detach().float().clone()
        setattr(modules[parent_name] if parent_name else model, child, layer)
        swapped.append(found[0])
    return swapped
