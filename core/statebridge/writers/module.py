"""Writing into an ``nn.Module``: every tensor is checked and staged, then the module is filled at once.

**Staged, then committed.** :meth:`ModuleWriter.write` only checks and keeps
each tensor; :meth:`ModuleWriter.finish` fills the module in one pass that
reads no file and runs no step.  A step, a source or a check that fails on the
last group therefore leaves the module exactly as it was.  The price is memory:
the tensors a step computed are held until the end (for a meta-device model
they are what the model keeps anyway); tensors read unchanged from a file are
private memory maps, which cost nothing until committed and are released one
by one as they are.

**Filling.** Regular parameters and buffers are filled in place (``copy_``,
casting on the fly: torch copies large tensors with all its threads, which
measured faster than reading the file straight into the parameter with one
``preadv``).  Meta-device ones get real tensors by assignment, so a model can
be built without memory and materialised straight from the checkpoint; an
unchanged tensor assigned this way is a private memory map of the file, so its
pages are read when first used and memory grows only with what is computed.

**Ties.** Names that are one tensor in the module (``lm_head.weight`` tied to
the embedding) are filled once: a meta model gets one parameter under every
name, a tie is satisfied by any of its names, and a pipeline that gives two
tied names different values is refused, naming both.

**Casts.** A dtype change that would alter values involving integers (``300``
into ``int8``, ``2.5`` into ``int32``, ``2**24 + 1`` into ``float32``) is
refused, naming the key and the first value that would change.  Casts between
floating-point types round as usual.

**Aliasing.** An assigned tensor never shares memory with the caller's tensors
(a ``dict`` or ``nn.Module`` source) nor with another parameter it is not tied
to, unless ``share=True`` asks for the source's tensors themselves; a tensor
staged for a regular parameter never reads memory the commit overwrites, so a
module can be loaded from itself through a swap.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExecutionError, PlanError
from ..readers.base import Source
from ..readers.memory import DictSource
from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys, suggested_keys
from .base import Writer

if TYPE_CHECKING:
    import torch
    from torch import nn

#: where a tensor's bytes live: (device, storage address), then the byte range inside that storage
Extent = tuple[tuple[str, int], int, int]


class ModuleWriter(Writer):
    """A writer whose target is a live module instead of a file (see the module docstring for its guarantees)."""

    format = "module"

    def __init__(
        self, module: nn.Module, *, strict: bool = True, share: bool = False, source: Source | None = None,
        suggest: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(Path("<module>"))
        #: the ``suggest_keys`` hook caller: a strict load that fails for unmatched keys names the nearest module keys
        self.suggest = suggest
        self.module = module
        self.strict = strict
        self.share = share
        self.slots = module.state_dict(keep_vars=True)
        #: every key's tie: the names of the module that are the same tensor (the key alone if untied)
        self.ties = _ties(self.slots)
        #: pipeline keys the module does not have, not loaded (``strict=False`` only)
        self.skipped: list[str] = []
        #: module keys the pipeline does not make, left as they were (``strict=False`` only)
        self.missing: list[str] = []
        self._staged: dict[str, torch.Tensor] = {}  # one entry per tie, under the first of its keys written
        self._callers = _Extents(source.tensors() if isinstance(source, DictSource) else ())
        self._overwritten = _Extents(slot for slot in self.slots.values() if not slot.is_meta)
        self._assigned = _Extents()

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        unexpected = [k for k in metas if k not in self.slots]
        missing = [k for k in self.slots if not any(name in metas for name in self.ties[k])]
        problems = []
        if unexpected and self.strict:
            problems.append(f"{len(unexpected)} keys the module does not have: {describe_keys(unexpected)}")
        if missing and self.strict:
            problems.append(f"{len(missing)} module keys the pipeline does not produce: {describe_keys(missing)}")
        for key, meta in metas.items():
            slot = self.slots.get(key)
            if slot is not None and tuple(slot.shape) != meta.shape:
                problems.append(f"{key!r}: the pipeline makes {meta} but the module expects {list(slot.shape)}")
        if problems:
            near = ""
            if self.strict and unexpected and missing:
                wanted = {k: TensorMeta(tuple(self.slots[k].shape), self.slots[k].dtype) for k in missing}
                near = suggested_keys(self.suggest, {k: metas[k] for k in unexpected}, wanted)
            raise PlanError(f"cannot load into {self._name}: " + "; ".join(problems) + near)
        self.skipped, self.missing = unexpected, missing

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Check ``tensor`` against its slot and stage it; nothing in the module changes before :meth:`finish`."""
        slot = self.slots.get(key)
        if slot is None:  # a key the module does not have, allowed by strict=False
            return
        value = self._cast(key, tensor, slot)
        tied = next((name for name in self.ties[key] if name in self._staged), None)
        if tied is not None:
            if not _same(self._staged[tied].to(slot.dtype), value.to(slot.dtype)):
                first, second = (name for name in self.ties[key] if name in (tied, key))  # in the module's order
                raise ExecutionError(
                    f"cannot load into {self._name}: {first!r} and {second!r} are one tied tensor in the module, but the "
                    "pipeline gives them different values; drop one of them (the tie fills both) or untie the module"
                )
            return
        self._staged[key] = self._owned(slot, value)

    def finish(self) -> list[Path]:
        """Fill the module with every staged tensor, releasing each once it is in place."""
        import torch

        while self._staged:
            key = next(iter(self._staged))
            value = self._staged.pop(key)
            slot = self.slots[key]
            if slot.is_meta:
                self._assign(key, slot, value)
            else:
                with torch.no_grad():
                    slot.copy_(value)
        if self.skipped or self.missing:
            parts = []
            if self.skipped:
                parts.append(f"{len(self.skipped)} keys the module does not have were not loaded: {describe_keys(self.skipped)}")
            if self.missing:
                parts.append(
                    f"{len(self.missing)} module keys the pipeline does not produce were left as they were: "
                    f"{describe_keys(self.missing)}"
                )
            warnings.warn(f"load_into(strict=False) into {self._name}: " + "; ".join(parts), RuntimeWarning, stacklevel=3)
        return []

    def abort(self) -> None:
        """Drop what was staged: the module was never touched."""
        self._staged.clear()

    @property
    def _name(self) -> str:
        return type(self.module).__name__

    def _cast(self, key: str, tensor: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the slot's dtype where it must be (assignment, a checked cast); refuse casts that change values.

        Casts involving an integer or boolean type are checked by casting back:
        any value that does not survive is refused.  Floating-point casts are
        left to ``copy_`` for regular slots, so an unchanged tensor stays a
        memory map until committed.
        """
        if tensor.dtype == slot.dtype:
            return tensor
        if _integral(tensor.dtype) or _integral(slot.dtype):
            cast = tensor.to(slot.dtype)
            changed = (cast.to(tensor.dtype) != tensor).flatten().nonzero()
            if len(changed):
                i = int(changed[0])
                raise ExecutionError(
                    f"cannot load {key!r} into {self._name}: the module's {_dtype(slot.dtype)} cannot hold its "
                    f"{_dtype(tensor.dtype)} values ({tensor.flatten()[i].item()} would become {cast.flatten()[i].item()}, "
                    f"{len(changed)} of {tensor.numel()} values change); add a cast step if that is meant"
                )
            return cast
        return tensor.to(slot.dtype) if slot.is_meta else tensor

    def _owned(self, slot: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value``, copied if committing it as it is would alias memory it must not.

        Memory the commit overwrites (the module's own, when it is also the
        source) is never read at commit time; an assigned tensor shares no memory
        with the caller's tensors or with another assigned one, unless ``share``.
        """
        if not slot.is_meta and _layout(value) == _layout(slot):
            return value  # the slot itself (a module loaded from itself): committing it changes nothing
        aliased = self._overwritten.overlaps(value)
        if slot.is_meta and not self.share:
            aliased = aliased or self._callers.overlaps(value) or self._assigned.overlaps(value)
        if aliased:
            value = value.clone()
        if slot.is_meta:
            self._assigned.add(value)
        return value

    def _assign(self, key: str, slot: torch.Tensor, value: torch.Tensor) -> None:
        """Give a meta slot its tensor, as one parameter (or buffer) under every name of its tie."""
        from torch import nn

        tensor = nn.Parameter(value, requires_grad=slot.requires_grad) if isinstance(slot, nn.Parameter) else value
        for name in self.ties[key]:
            owner_name, _, attr = name.rpartition(".")
            owner = self.module.get_submodule(owner_name) if owner_name else self.module
            (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = tensor
            self.slots[name] = tensor


def _ties(slots: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Each key's tie: the keys naming the same tensor (one object on meta, the same bytes otherwise)."""
    groups: dict[object, list[str]] = defaultdict(list)
    for key, slot in slots.items():
        groups[("object", id(slot)) if slot.is_meta else _extent(slot) or ("empty", key)].append(key)
    return {key: tuple(names) for names in groups.values() for key in names}


def _extent(tensor: torch.Tensor) -> Extent | None:
    """Where ``tensor``'s bytes live, or None when it has none (empty, or on meta)."""
    if tensor.is_meta or tensor.numel() == 0:
        return None
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    span = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    return (str(tensor.device), tensor.untyped_storage().data_ptr()), start, start + span * size


def _layout(tensor: torch.Tensor) -> tuple[object, ...]:
    """Where and how ``tensor``'s elements lie: equal for two views of the same elements in the same order."""
    return _extent(tensor), tensor.dtype, tuple(tensor.shape), tensor.stride()


class _Extents:
    """Byte ranges of tensors, by storage, to tell whether another tensor overlaps any of them."""

    def __init__(self, tensors: Iterable[torch.Tensor] = ()) -> None:
        self._ranges: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for tensor in tensors:
            self.add(tensor)

    def add(self, tensor: torch.Tensor) -> None:
        extent = _extent(tensor)
        if extent is not None:
            self._ranges[extent[0]].append(extent[1:])

    def overlaps(self, tensor: torch.Tensor) -> bool:
        extent = _extent(tensor)
        if extent is None:
            return False
        storage, start, end = extent
        return any(s < end and start < e for s, e in self._ranges.get(storage, ()))


def _integral(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (NaN matching NaN)."""
    equal = a == b
    if a.is_floating_point() or a.is_complex():
        equal |= a.isnan() & b.isnan()
    return bool(equal.all())
