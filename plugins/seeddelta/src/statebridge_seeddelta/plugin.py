"""The statebridge-seeddelta plugin: seed-delta compression.

This plugin will provide the ``seeddelta`` transform, which stores a fine-tuned state as a
compact delta against a base state regenerated from a seed, and the
reconstruction of full tensors from it.

Nothing is implemented yet: the module is registered through the ``statebridge``
entry point and implements no hook, so ``statebridge plugins`` lists it as installed,
providing nothing yet, and offers nothing it cannot do.
"""
