"""Output formats: each writer streams a plan's tensors into one format (see :class:`~statebridge.writers.base.Writer`)."""
