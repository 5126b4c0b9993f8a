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


@hookspec(firstresult=True)
def suggest_keys(unmatched, candidates):
    """Did you mean: for each key a pipeline makes that its target does not want, the target's nearest keys.

    Called only when a plan is about to fail for keys that do not match a known target: a
    ``load_into`` module with ``strict`` (keys the module lacks), or ``require: {no_missing}`` /
    ``{no_extra}`` against ``expect:`` (a checkpoint, a module, a key list).  ``unmatched`` maps the
    keys made but not wanted, ``candidates`` the target's keys that nothing makes, each to its
    :class:`statebridge.TensorMeta` (or None when only the name is known: a key list).  Return
    ``{unmatched key: [candidate keys, best first]}`` (keys without a suggestion left out), or None
    to let the next plugin answer.  The first answer that is not None is used; the error names the
    first few suggestions.  Without an implementation (or if it raises) the error is unchanged.
    Keep it quick on 100,000 keys: it runs on the error path of every such failure.
    """
