"""The statebridge-analysis plugin: analyses.

This plugin will provide analyses for ``statebridge analyze`` beyond the core's ``summary``:
reports that compare states (per-tensor differences, spectra, outliers) and
describe where a transformation changed a model.

Nothing is implemented yet: the plugin registers itself through the
``statebridge`` entry point and implements ``statebridge_analyses``, which
returns an empty list, so ``statebridge plugins`` shows it as installed without
offering anything it cannot do.
"""

from __future__ import annotations

from statebridge import hookimpl


@hookimpl
def statebridge_analyses() -> list[str]:
    """The analyses this plugin answers in ``statebridge_analyze``: none yet (see the module docstring)."""
    return []
