"""The plugin author's manual: every hook statebridge calls, what it passes, what it expects.

A plugin is a package with an entry point in the group ``statebridge`` naming a module whose
functions carry ``@hookimpl`` and the names below; the core's own transforms, writers, gates,
checks, analyses and commands are plugins of exactly this kind (``plugins.DEFAULT_PLUGINS``).
Each ``register_*`` hook receives a ``register`` function; call it once per thing you provide.
Names may be namespaced (``myplugin.transpose``); a name two plugins register is an error naming
both; a disabled plugin's registrations are gone. Keep the entry-point module light: import
torch or heavy modules inside your functions, so ``statebridge --help`` stays instant.
"""

import pluggy

hookspec = pluggy.HookspecMarker("statebridge")
#: decorate your hook implementations with this
hookimpl = pluggy.HookimplMarker("statebridge")


@hookspec
def register_transforms(register):
    """``register(cls)``: a :class:`statebridge.Transform` subclass, named by its ``name`` attribute."""


@hookspec
def register_writers(register):
    """``register(cls)``: a :class:`statebridge.Writer` subclass for the output format named by its ``format``."""


@hookspec
def register_gates(register):
    """``register(name, gate)``: ``gate(key, candidate, inputs, group, setting) -> GateDecision | None``.

    Runs on each computed tensor when the config's ``gates:`` names it (``setting`` is its value there).
    """


@hookspec
def register_analyses(register):
    """``register(name, analysis)``: ``analysis(sources, model, options) -> statebridge.Report``."""


@hookspec
def register_commands(register):
    """``register(command)``: a ``click`` command or group, run as ``statebridge <name> ...``."""


@hookspec
def validate_plan(plan):
    """Return :class:`statebridge.Finding` objects about ``plan`` (no data read); errors stop the run."""
