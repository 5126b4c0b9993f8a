"""The statebridge-lora plugin: LoRA adapters.

This plugin will provide transforms for LoRA adapters: ``lora_merge`` (fold an adapter's
``A``/``B`` matrices into the base weights), ``lora_layout`` (convert between
PEFT and other adapter key layouts) and ``lora_extract`` (recover a low-rank
adapter from the difference of two states).

Nothing is implemented yet: the module is registered through the ``statebridge``
entry point and implements no hook, so ``statebridge plugins`` lists it as installed,
providing nothing yet, and offers nothing it cannot do.
"""
