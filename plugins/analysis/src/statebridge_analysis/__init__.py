"""statebridge-analysis: the analyses plugin for statebridge (entry point: :mod:`statebridge_analysis.plugin`)."""
