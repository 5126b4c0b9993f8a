"""statebridge-seeddelta: the seed-delta compression plugin for statebridge (entry point: :mod:`statebridge_seeddelta.plugin`)."""
