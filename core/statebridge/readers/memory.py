"""Sources over state already in memory: a dict of tensors, or an ``nn.Module``."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from ..tensors.meta import TensorMeta
from .base import Source, check_key, unreadable

if TYPE_CHECKING:
    import torch
    from torch import nn


def is_module(obj: Any) -> bool:
    """Whether ``obj`` is an ``nn.Module``, without importing torch (none exists before it is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


class DictSource(Source):
    """A mapping of names to tensors (for example a ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<dict>") -> None:
        import torch

        self.name = name
        self._tensors = dict(tensors)
        bad = [k for k, v in self._tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise SourceError(name, f"value of {bad[0]!r} is a {type(self._tensors[bad[0]]).__name__}, not a tensor")
        for key, tensor in self._tensors.items():
            check_key(name, key)
            # meta tensors are welcome here: a meta-device module describes a target without data
            problem = None if tensor.is_meta else unreadable(tensor)
            if problem:
                raise SourceError(name, f"tensor {key!r} {problem}")
        self._metas = {k: TensorMeta.of(v) for k, v in self._tensors.items()}

    def metas(self) -> Mapping[str, TensorMeta]:
        return self._metas

    def load(self, key: str) -> torch.Tensor:
        try:
            tensor = self._tensors[key]
        except KeyError:
            raise SourceError(self.name, f"no tensor named {key!r}") from None
        if tensor.is_meta:
            raise SourceError(self.name, f"{key!r} is on the meta device and has no data to read")
        return tensor.detach().cpu()

    def tensors(self) -> list[torch.Tensor]:
        """The caller's tensors this source reads: what :meth:`load` returns may be their very memory.

        A writer that keeps loaded tensors (``load_into`` assigning a meta
        model's parameters) copies any that overlap them, so the result never
        aliases the caller's state unless asked to.
        """
        return list(self._tensors.values())


class ModuleSource(DictSource):
    """An ``nn.Module``'s parameters and persistent buffers; meta-device modules give metadata only."""

    def __init__(self, module: nn.Module, name: str | None = None) -> None:
        super().__init__(module.state_dict(keep_vars=True), name or f"<{type(module).__name__}>")
