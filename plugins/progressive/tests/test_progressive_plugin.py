"""Smoke test: the installed statebridge-progressive distribution is found through its entry point."""

import re
from importlib.metadata import entry_points

import pluggy

from statebridge import hookspecs


def test_progressive_plugin_is_discovered() -> None:
    (ep,) = [e for e in entry_points(group="statebridge") if e.name == "progressive"]
    assert re.sub(r"[-_.]+", "-", ep.dist.name).lower() == "statebridge-progressive"
    assert ep.dist.version == "0.1.0"
    module = ep.load()
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(module)  # checks the hook implementations against the specs
    assert "statebridge_transform" in [caller.name for caller in manager.get_hookcallers(module)]
