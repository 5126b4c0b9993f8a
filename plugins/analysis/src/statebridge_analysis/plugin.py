"""The statebridge-analysis plugin: analyses.

This plugin will provide analyses for ``statebridge analyze`` beyond the core's ``summary``:
reports that compare states (per-tensor differences, spectra, outliers) and
describe where a transformation changed a model.

Nothing is implemented yet: the module is registered through the ``statebridge``
entry point and implements no hook, so ``statebridge plugins`` lists it as installed,
providing nothing yet, and offers nothing it cannot do.
"""
