"""statebridge-progressive: the progressive growth plugin for statebridge (entry point: :mod:`statebridge_progressive.plugin`)."""
