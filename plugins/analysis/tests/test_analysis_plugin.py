"""The installed statebridge-analysis distribution is found through its entry point and loads cleanly."""

from statebridge.testing import assert_plugin_loads


def test_analysis_plugin_is_discovered_with_its_commands() -> None:
    plugin = assert_plugin_loads("analysis", "statebridge-analysis")
    assert plugin.provides == {"commands": ["automap", "diff", "lint"], "transforms": ["permute_rows"]}
    assert plugin.hooks == ["register_commands", "register_transforms", "suggest_keys"]
