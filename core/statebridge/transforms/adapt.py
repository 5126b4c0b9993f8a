"""Shape adaptation for warm starts across architecture changes (research use, off by default).

``adapt_shapes`` makes tensors fit the shapes of a target (a checkpoint's
header, a module, or an explicit table) by slicing, zero-padding, or copying
the overlapping block into a freshly initialised tensor.  It only runs where a
step names it, and every changed key is listed in the plan with old and new shape.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from ..errors import PlanError
from ..tensors.meta import TensorMeta
from .base import Group, Params, PathParam, Transform
from .matching import select

if TYPE_CHECKING:
    import torch
    from torch import nn


class AdaptShapes(Transform):
    """Fit tensors to target shapes: ``slice``, ``pad`` or ``copy_and_init_rest``.

    ``shapes`` maps keys to target shapes; ``like`` names a checkpoint whose
    header gives them.  Keys absent from the target, or already the right
    shape, are left alone.  ``copy_and_init_rest`` fills the new region from
    ``normal(0, init_std)`` seeded per key by ``seed`` (or zeros when
    ``init_std`` is 0), so runs are reproducible.
    """
    name = "adapt_shapes"

    class Params(Params):
        strategy: Literal["slice", "pad", "copy_and_init_rest"]
        shapes: dict[str, list[int]] | None = None
        like: PathParam | None = None
        pattern: str = "**"
        pad_value: float = 0.0
        init_std: float = 0.02
        seed: int = 0

        @model_validator(mode="after")
        def _one_target(self) -> "AdaptShapes.Params":
            if (self.shapes is None) == (self.like is None):
                raise ValueError("give either 'shapes' (key -> shape) or 'like' (a checkpoint path)")
            return self

    @classmethod
    def to_module(cls, module: nn.Module, strategy: str, **kwargs) -> "AdaptShapes":
        """Adapt to the shapes of ``module``'s parameters and buffers (meta-device modules work)."""
        shapes = {k: list(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
        return cls(strategy=strategy, shapes=shapes, **kwargs)

    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.params.shapes is not None:
            return {k: tuple(v) for k, v in self.params.shapes.items()}
        from ..readers import open_source

        with open_source(self.params.like) as target:
            return {k: m.shape for k, m in target.metas().items()}

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        targets = self.target_shapes()
        groups = []
        for key in select(self.params.pattern, metas, strict=False):
            meta = metas[key]
            shape = targets.get(key)
            if shape is None or tuple(shape) == meta.shape:
                continue
            if len(shape) != len(meta.shape):
                raise PlanError(f"{key!r}: cannot adapt {meta} to {list(shape)}: the number of dimensions differs")
            self._check(key, meta, shape)
            out = TensorMeta(tuple(shape), meta.dtype)
            groups.append(
                Group.map_one(
                    key, key, out, self._fn(key, tuple(shape)), f"adapt_shapes({self.params.strategy}: {list(meta.shape)} to {list(shape)})"
                )
            )
        return groups

    def _check(self, key: str, meta: TensorMeta, shape: tuple[int, ...]) -> None:
        strategy = self.params.strategy
        if strategy == "slice" and any(t > s for s, t in zip(meta.shape, shape)):
            raise PlanError(f"{key!r}: 'slice' cannot grow {list(meta.shape)} to {list(shape)}; use 'pad' or 'copy_and_init_rest'")
        if strategy == "pad" and any(t < s for s, t in zip(meta.shape, shape)):
            raise PlanError(f"{key!r}: 'pad' cannot shrink {list(meta.shape)} to {list(shape)}; use 'slice' or 'copy_and_init_rest'")
        if strategy == "copy_and_init_rest" and not meta.dtype.is_floating_point:
            raise PlanError(f"{key!r}: 'copy_and_init_rest' needs a floating-point tensor, not {meta}")

    def _fn(self, key: str, shape: tuple[int, ...]):
        p = self.params

        def adapt(x: torch.Tensor) -> torch.Tensor:
            import torch

            overlap = tuple(slice(0, min(s, t)) for s, t in zip(x.shape, shape))
            if p.strategy == "slice":
                return x[overlap].contiguous()
            if p.strategy == "pad":
                out = torch.full(shape, p.pad_value, dtype=x.dtype)
            elif p.init_std == 0:
                out = torch.zeros(shape, dtype=x.dtype)
            else:
                generator = torch.Generator().manual_seed(p.seed * 1_000_003 + zlib.crc32(key.encode()))
                out = torch.empty(shape, dtype=torch.float32).normal_(0.0, p.init_std, generator=generator).to(x.dtype)
            out[overlap] = x[overlap]
            return out

        return adapt
