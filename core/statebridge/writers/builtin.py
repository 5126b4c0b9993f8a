"""The built-in writers (safetensors and shards, GGUF, torch), registered as a default plugin."""

from ..hookspecs import hookimpl


@hookimpl
def register_writers(register):
    from .gguf import GGUFWriter
    from .safetensors import SafetensorsWriter
    from .torch_file import TorchWriter

    for cls in (SafetensorsWriter, GGUFWriter, TorchWriter):
        register(cls)
