"""statebridge-lora: the LoRA adapters plugin for statebridge (entry point: :mod:`statebridge_lora.plugin`)."""
