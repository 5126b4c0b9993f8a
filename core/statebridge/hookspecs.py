"""The plugin author's manual: every hook statebridge calls, what it passes, what it expects.

A plugin is an ordinary Python package with an entry point in the group
``statebridge``::

    [project.entry-points.statebridge]
    my_plugin = "my_package.plugin"

The entry point names a module (or any object) whose functions are decorated
with :data:`hookimpl` and named after the hooks below.  statebridge imports it
at start-up; a plugin that fails to import is reported with a warning naming
its distribution and version, and the others still load
(``STATEBRIDGE_STRICT_PLUGINS=1`` makes that fatal).  The core's own transforms,
writers, checks and analyses are registered through these same hooks
(``statebridge.default_plugins``), so a third-party plugin has exactly the
powers of a built-in one.

Hooks that return lists are called on every plugin and their results are
concatenated; hooks marked *first result* stop at the first plugin that
returns something other than ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .analyze import Report
    from .checks import Finding
    from .gates import GateDecision
    from .io.base import Source
    from .plan import Plan
    from .transforms.base import Group, Transform
    from .writers.base import Writer

PROJECT = "statebridge"
hookspec = pluggy.HookspecMarker(PROJECT)
#: decorate your hook implementations with this
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def statebridge_transform() -> Iterable[type["Transform"]]:
    """Return the transform classes this plugin provides.

    Each class subclasses :class:`statebridge.Transform`, has a pydantic
    ``Params`` model and a config name.  Classes decorated with
    ``@register_transform("name")`` in a plugin's entry-point module are
    registered without this hook; implement it when you build classes
    dynamically or want to list them explicitly.  Two plugins registering the
    same name is an error naming both.
    """


@hookspec
def statebridge_validate(plan: "Plan") -> Iterable["Finding"] | None:
    """Check a plan before any tensor byte is read; return findings.

    ``plan`` carries the source metadata, every group's inputs and outputs with
    shapes and dtypes, lineage and the run options (``plan.options``).  Return
    :class:`statebridge.Finding` objects: ``level="error"`` stops the run
    before anything is written; warnings and infos go into the report.
    """


@hookspec(firstresult=True)
def statebridge_analyze(
    analysis: str, sources: Sequence["Source"], model: "nn.Module | None", options: Mapping[str, Any]
) -> "Report | None":
    """Produce the report named ``analysis`` about one or more states (first result).

    Called by ``statebridge analyze NAME PATH [PATH...]`` and by
    :func:`statebridge.analyze`.  Return ``None`` for analyses you do not
    provide.  The core provides ``summary`` (what ``statebridge inspect``
    shows); list the names you provide in :func:`statebridge_analyses`.
    """


@hookspec
def statebridge_analyses() -> Iterable[str]:
    """Return the names of the analyses this plugin answers in :func:`statebridge_analyze`."""


@hookspec
def statebridge_export() -> Iterable[type["Writer"]]:
    """Return writer classes; each serves the output format named by its ``format`` attribute.

    The writer for a run is the one whose ``format`` equals the config's
    ``format`` (or, when none is given, the first whose ``for_target(path)``
    accepts the target path).  A writer receives all output metadata first
    (:meth:`Writer.begin`), then tensors one at a time, and writes into a
    staging path that statebridge renames into place on success.
    """


@hookspec
def statebridge_gate(
    key: str, candidate: "torch.Tensor", inputs: Mapping[str, "torch.Tensor"], group: "Group", options: Mapping[str, Any]
) -> "GateDecision | None":
    """Accept or reject one candidate tensor before it is written.

    Called by the executor for each output tensor (and for each alternative
    when a transform offers :class:`statebridge.Candidates`).  ``inputs`` are
    the group's source tensors, ``options`` the config's ``gates`` section.
    Return ``None`` to abstain or a :class:`statebridge.GateDecision`; the first
    candidate no gate rejects is written, and every decision is in the report.
    """
