"""The installed statebridge-lora distribution is found through its entry point and provides its steps and command."""

from statebridge.plugins import installed
from statebridge.testing import assert_plugin_loads
from statebridge_lora.transforms import LoraMerge


def test_lora_plugin_is_discovered_with_its_transforms_and_command() -> None:
    plugin = assert_plugin_loads("lora", "statebridge-lora")
    assert plugin.provides == {"transforms": ["lora_extract", "lora_layout", "lora_merge"], "commands": ["lora"]}
    assert plugin.hooks == ["register_commands", "register_transforms", "validate_plan"]
    assert installed().transforms.get("lora_merge") is LoraMerge
