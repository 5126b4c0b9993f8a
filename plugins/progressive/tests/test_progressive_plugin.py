"""The installed statebridge-progressive distribution is found through its entry point and provides its transforms and command."""

from statebridge.testing import assert_plugin_loads


def test_progressive_plugin_is_discovered() -> None:
    info = assert_plugin_loads("progressive", "statebridge-progressive")
    assert info.provides == {"transforms": ["grow_depth", "grow_width"], "writers": ["tprog"], "commands": ["grow"]}
