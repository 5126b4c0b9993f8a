"""The statebridge-progressive plugin: progressive growth.

This plugin will provide transforms for growing a model while keeping its function:
``grow_depth`` (insert layers initialised from existing ones), ``grow_width``
(widen hidden dimensions function-preservingly) and ``ewc`` (Fisher-weighted
parameter anchoring for continued training).

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
