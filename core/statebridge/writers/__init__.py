"""Output formats. Each writer streams a plan's tensors into one format (see :class:`Writer`)."""

from .base import Writer
from .gguf import GGUFWriter
from .module import ModuleWriter
from .safetensors import SafetensorsWriter
from .torch_file import TorchWriter

__all__ = ["GGUFWriter", "ModuleWriter", "SafetensorsWriter", "TorchWriter", "Writer"]
