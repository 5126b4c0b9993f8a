"""statebridge-seeddelta: SeedΔ for statebridge (entry point: :mod:`statebridge_seeddelta.plugin`).

``statebridge_seeddelta.open_layers(path)`` and ``swap_into(model, layers)`` are the PyTorch
runtime (:mod:`.runtime`); they load on first use, so importing the plugin never imports torch.
"""

from __future__ import annotations

from typing import Any

_RUNTIME = ("open_layers", "swap_into", "SeedDeltaLinear")

__all__ = list(_RUNTIME)


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'statebridge_seeddelta' has no attribute {name!r}")
