"""The statebridge-lora plugin: LoRA adapters.

This plugin will provide transforms for LoRA adapters: ``lora_merge`` (fold an adapter's
``A``/``B`` matrices into the base weights), ``lora_layout`` (convert between
PEFT and other adapter key layouts) and ``lora_extract`` (recover a low-rank
adapter from the difference of two states).

Nothing is implemented yet: the plugin registers itself through the
``statebridge`` entry point and implements ``statebridge_transform``, which
returns an empty list, so ``statebridge plugins`` shows it as installed without
offering anything it cannot do.
"""

from __future__ import annotations

from statebridge import hookimpl


@hookimpl
def statebridge_transform() -> list[type]:
    """The transform classes of this plugin: none yet (see the module docstring)."""
    return []
