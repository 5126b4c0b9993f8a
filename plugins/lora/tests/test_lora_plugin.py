"""The installed statebridge-lora distribution is found through its entry point and loads cleanly."""

from statebridge.testing import assert_plugin_loads


def test_lora_plugin_is_discovered() -> None:
    assert_plugin_loads("lora", "statebridge-lora")
