"""The installed statebridge-seeddelta distribution is found through its entry point and loads cleanly."""

from statebridge.testing import assert_plugin_loads


def test_seeddelta_plugin_is_discovered() -> None:
    assert_plugin_loads("seeddelta", "statebridge-seeddelta")
