"""Running analyses: reports about states from the analyses plugins registered (``summary`` is the core's).

Kept apart from :mod:`statebridge.api` so that ``statebridge inspect`` reads
headers without importing the planning and execution machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .plugins import installed
from .readers import SourceLike, open_source

if TYPE_CHECKING:
    from torch import nn

    from .trust.summary import Report


def analyze(analysis: str, *sources: SourceLike, model: nn.Module | None = None, **options: Any) -> Report:
    """Run the analysis named ``analysis`` (``summary``, or one a plugin registered) on ``sources``."""
    function = installed().analyses.get(analysis)
    return function([open_source(s) for s in sources], model, dict(options))
