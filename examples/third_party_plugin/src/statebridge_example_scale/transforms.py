"""The ``scale_by_name`` transform.

The plugin module (:mod:`statebridge_example_scale.plugin`) imports this one
only inside its ``register_transforms`` hook: statebridge imports every
plugin's entry-point module at start-up, and ``statebridge --help`` should not
pay for pydantic or torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import statebridge

if TYPE_CHECKING:
    import torch


class ScaleByName(statebridge.Transform):
    """Multiply every floating-point tensor whose name matches ``pattern`` by ``factor``.

    The product is computed in float32 (float64 for float64 tensors) and cast
    back, so shapes and dtypes never change.  Matching a non-floating-point
    tensor is an error, found when the plan is built, before any data is read.
    """

    name = "scale_by_name"

    class Params(statebridge.Params):
        pattern: str  # a statebridge key pattern: ``*`` is one name component, ``**`` anything
        factor: float
        strict: bool = True  # a pattern matching no key is an error

    def keys(self, metas: Mapping[str, statebridge.TensorMeta]) -> list[str]:
        keys = statebridge.select(self.params.pattern, metas, self.params.strict)
        for key in keys:
            if not metas[key].dtype.is_floating_point:
                raise statebridge.PlanError(f"scale_by_name matched {key!r} ({metas[key]}), which is not floating point")
        return keys

    def plan(self, metas: Mapping[str, statebridge.TensorMeta]) -> list[statebridge.Group]:
        # Declared from metadata alone: one group per matching key, same name, shape and dtype.
        return [
            statebridge.Group.map_one(
                key, key, metas[key], self._scale(), f"scale_by_name(factor={self.params.factor})"
            )
            for key in self.keys(metas)
        ]

    def _scale(self) -> Callable[[torch.Tensor], torch.Tensor]:
        factor = self.params.factor

        def scale(x: torch.Tensor) -> torch.Tensor:
            # torch is imported here, when data is touched, not at the top of the module: statebridge
            # imports every plugin on start, and planning or a raw-copy run never needs torch.
            import torch

            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            return (x.to(work) * factor).to(x.dtype)

        return scale
