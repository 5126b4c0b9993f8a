"""The installed statebridge-seeddelta distribution is found through its entry point and provides what it says."""

from statebridge.testing import assert_plugin_loads


def test_seeddelta_plugin_is_discovered() -> None:
    plugin = assert_plugin_loads("seeddelta", "statebridge-seeddelta")
    assert plugin.provides["transforms"] == ["seeddelta"]
    assert plugin.provides["gates"] == ["seeddelta.quality"]
    assert plugin.provides["commands"] == ["seeddelta"]


def test_the_entry_point_module_stays_light() -> None:
    """``statebridge --help`` imports every plugin: this one must not bring torch or the math with it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, statebridge_seeddelta.plugin; print(sorted(m for m in "
                          "sys.modules if m == 'torch' or m.startswith('statebridge_seeddelta.')))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['statebridge_seeddelta.plugin']"
