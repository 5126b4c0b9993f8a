"""The ``scale_by_name`` transform, and a check that warns about a factor of 0.

statebridge imports this module through the entry point in ``pyproject.toml``.
Importing it registers :class:`ScaleByName` (``@register_transform``), and
pluggy finds :func:`statebridge_validate` by its name and ``@hookimpl``.

Use it in a config like any built-in transform::

    steps:
      - scale_by_name: {pattern: "model.layers.*.mlp.down_proj.weight", factor: 0.5}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import statebridge
from statebridge.checks import Finding
from statebridge.errors import PlanError
from statebridge.meta import TensorMeta
from statebridge.transforms.matching import select

if TYPE_CHECKING:
    import torch


@statebridge.register_transform("scale_by_name")
class ScaleByName(statebridge.Transform):
    """Multiply every floating-point tensor whose name matches ``pattern`` by ``factor``.

    The product is computed in float32 (float64 for float64 tensors) and cast
    back, so shapes and dtypes never change.  Matching a non-floating-point
    tensor is an error, found when the plan is built, before any data is read.
    """

    class Params(statebridge.Params):
        pattern: str  # a statebridge key pattern: ``*`` is one name component, ``**`` anything
        factor: float
        strict: bool = True  # a pattern matching no key is an error

    def keys(self, metas: Mapping[str, TensorMeta]) -> list[str]:
        keys = select(self.params.pattern, metas, self.params.strict)
        for key in keys:
            if not metas[key].dtype.is_floating_point:
                raise PlanError(f"scale_by_name matched {key!r} ({metas[key]}), which is not floating point")
        return keys

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[statebridge.Group]:
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


def _steps(transform: object) -> Iterator[object]:
    """``transform`` and, for composites (sequential, parallel, scope), every step inside it."""
    yield transform
    for step in getattr(transform, "steps", None) or ():
        yield from _steps(step)


@statebridge.hookimpl
def statebridge_validate(plan) -> list[Finding]:
    """Warn about every ``scale_by_name`` step whose factor is 0 (it zeroes the tensors it matches)."""
    pipeline = getattr(plan, "pipeline", None)
    if pipeline is None:
        return []
    return [
        Finding(
            "warning",
            f"scale_by_name with factor 0 sets every tensor matching {step.params.pattern!r} to zero",
            check="example_scale.zero_factor",
        )
        for step in _steps(pipeline)
        if isinstance(step, ScaleByName) and step.params.factor == 0
    ]
