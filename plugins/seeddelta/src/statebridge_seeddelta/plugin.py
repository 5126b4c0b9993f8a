"""The statebridge-seeddelta plugin: seed-delta compression.

This plugin will provide the ``seeddelta`` transform, which stores a fine-tuned state as a
compact delta against a base state regenerated from a seed, and the
reconstruction of full tensors from it.

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
