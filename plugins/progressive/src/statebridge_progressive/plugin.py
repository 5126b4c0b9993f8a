"""The statebridge-progressive plugin: progressive growth.

This plugin will provide transforms for growing a model while keeping its function:
``grow_depth`` (insert layers initialised from existing ones), ``grow_width``
(widen hidden dimensions function-preservingly) and ``ewc`` (Fisher-weighted
parameter anchoring for continued training).

Nothing is implemented yet: the module is registered through the ``statebridge``
entry point and implements no hook, so ``statebridge plugins`` lists it as installed,
providing nothing yet, and offers nothing it cannot do.
"""
