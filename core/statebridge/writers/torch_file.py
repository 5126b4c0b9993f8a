"""Streaming ``torch.save``-format writer: one zip record per tensor as it arrives.

A ``torch.save`` file is a zip archive: ``data.pkl`` (the pickled object, in
which each tensor refers to its storage by a *persistent id*) and one record
``data/<n>`` per storage holding its raw bytes.  ``torch.load`` finds records
by name, so their order in the archive does not matter.  That lets this writer
use torch's own zip writer (``torch._C.PyTorchFileWriter``, which aligns every
record to 64 bytes so ``torch.load(mmap=True)`` can map it) to append each
tensor's bytes the moment :meth:`TorchWriter.write` receives it, and pickle the
flat ``{key: tensor}`` dict only in :meth:`TorchWriter.finish`, when every
storage is already on disk.  At most one tensor is held at a time.

The pickle is built exactly as ``torch.serialization._save`` builds it: each
tensor reduces to ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride,
False, OrderedDict())`` (``_rebuild_tensor_v3`` with a trailing dtype for the
dtypes torch stores in an untyped storage), and each storage pickles as the
persistent id ``("storage", storage_type, "<n>", "cpu", numel)``.  Which of the
two forms and which storage type a dtype gets is asked of torch itself, by
reducing an empty tensor of that dtype, so the output follows the installed
torch version.  ``data.pkl`` is byte-identical to what ``torch.save`` writes for
the same dict, and ``torch.load(path, weights_only=True)`` accepts the file.

The archive is written through a Python file object, so its internal folder
is ``archive/`` whatever the (staging) file is called, and torch's zip writer
stamps no times: the same tensors give the same bytes.  ``metadata`` has no
place in a flat state dict and is not written.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ..errors import ConfigError, ExecutionError
from ..tensors.meta import TensorMeta, dtype_name
from .base import Writer

if TYPE_CHECKING:
    import torch

TORCH_TARGET_SUFFIXES = {".pt", ".pth", ".bin"}
#: what torch.save uses (torch.serialization.DEFAULT_PROTOCOL)
PICKLE_PROTOCOL = 2
#: torch.serialization's default storage alignment; records are padded to it so they can be mmapped
STORAGE_ALIGNMENT = 64


class _StorageRef:
    """Stands in for a tensor's storage in the pickle; pickled as a persistent id."""

    __slots__ = ("persistent_id",)

    def __init__(self, persistent_id: tuple[Any, ...]) -> None:
        self.persistent_id = persistent_id


class _TensorRef:
    """Pickles as the tensor it describes, without holding the tensor's data."""

    __slots__ = ("rebuild", "args")

    def __init__(self, rebuild: Any, args: tuple[Any, ...]) -> None:
        self.rebuild = rebuild
        self.args = args

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        return self.rebuild, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return obj.persistent_id
        return None


def _tensor_ref(meta: TensorMeta, storage_key: str) -> _TensorRef:
    """What ``torch.save`` would pickle for a contiguous CPU tensor of ``meta`` in storage ``storage_key``."""
    import torch

    # Ask torch how it reduces a tensor of this dtype (v2 + typed storage, or v3 + untyped + dtype).
    rebuild, template = torch.empty(0, dtype=meta.dtype.torch).__reduce_ex__(PICKLE_PROTOCOL)
    storage = template[0]
    if isinstance(storage, torch.storage.TypedStorage):
        storage_type = getattr(torch, storage._pickle_storage_type())
        numel = meta.numel
    elif isinstance(storage, torch.UntypedStorage):
        storage_type = torch.UntypedStorage
        numel = meta.nbytes
    else:  # pragma: no cover - a torch version with yet another scheme
        raise ConfigError(f"this torch version pickles {dtype_name(meta.dtype)} tensors in a way statebridge does not know")
    stride = torch.empty(meta.shape, dtype=meta.dtype.torch, device="meta").stride()  # contiguous; allocates nothing
    ref = _StorageRef(("storage", storage_type, storage_key, "cpu", numel))
    args = (ref, 0, tuple(meta.shape), stride, False, collections.OrderedDict()) + tuple(template[6:])
    return _TensorRef(rebuild, args)


class TorchWriter(Writer):
    """Writes a ``torch.save``-compatible ``.pt`` / ``.pth`` / ``.bin`` file holding a flat state dict."""

    format: ClassVar[str] = "torch"

    def __init__(self, path: Path, *, metadata: Mapping[str, str] | None = None, shard_size: int | None = None) -> None:
        super().__init__(path, metadata=metadata, shard_size=shard_size)
        self._file: BinaryIO | None = None
        self._zip: Any = None  # torch._C.PyTorchFileWriter
        self._metas: dict[str, TensorMeta] = {}
        self._storage_keys: dict[str, str] = {}
        self._written: set[str] = set()

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return Path(target).suffix.lower() in TORCH_TARGET_SUFFIXES

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        import torch

        if self._zip is not None:
            raise ExecutionError(f"{self.path}: begin() was called twice")
        self.check(metas)
        for key, meta in metas.items():  # asks torch, so here rather than in check(): dry runs stay torch-free
            try:
                _tensor_ref(meta, "0")
            except (RuntimeError, TypeError, KeyError) as e:
                raise self.refuse(key, f"torch cannot save a {dtype_name(meta.dtype)} tensor: {e}") from None
        self._metas = dict(metas)
        # Storage numbers follow the announced order, so the archive does not depend on arrival order.
        self._storage_keys = {key: str(i) for i, key in enumerate(metas)}
        self._written = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._zip = torch._C.PyTorchFileWriter(self._file, True, STORAGE_ALIGNMENT)
        # The small records torch.save writes next to data.pkl (torch.load checks byteorder and format_version).
        for name, value in ((".format_version", "1"), (".storage_alignment", str(STORAGE_ALIGNMENT)), ("byteorder", sys.byteorder)):
            self._zip.write_record(name, value, len(value))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        meta = self.announced(key, self._metas, self._written, started=self._zip is not None)
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ExecutionError(f"{self.path}: {key!r} is {TensorMeta.of(tensor)} but begin() announced {meta}")
        t = tensor.detach().to("cpu").contiguous()
        name = f"data/{self._storage_keys[key]}"
        if t.numel() == 0:
            self._zip.write_record(name, b"", 0)
            self._written.add(key)
            return
        if t.storage_offset() != 0:
            t = t.clone()  # the record is the first nbytes of a storage; a view into the middle needs its own
        # Straight from the tensor's storage (a memory map stays a memory map): no copy on the Python side.
        self._zip.write_record(name, t.untyped_storage(), t.nbytes)
        self._written.add(key)

    def finish(self) -> list[Path]:
        if self._zip is None or self._file is None:
            raise ExecutionError(f"{self.path}: finish() before begin()")
        missing = [k for k in self._metas if k not in self._written]
        if missing:
            raise ExecutionError(f"{self.path}: {len(missing)} announced tensors were never written, e.g. {missing[0]!r}")
        state = {key: _tensor_ref(meta, self._storage_keys[key]) for key, meta in self._metas.items()}
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(state)
        data = buffer.getvalue()
        zip_writer, handle = self._zip, self._file
        zip_writer.write_record("data.pkl", data, len(data))
        zip_writer.write_end_of_file()  # writes 'version', '.data/serialization_id' and the central directory
        self._zip = None
        del zip_writer
        handle.flush()
        self.sync(handle.fileno())
        handle.close()
        self._file = None
        return [self.path]

    def abort(self) -> None:
        # Finalize the zip writer before dropping it: its destructor would otherwise do that through the
        # file, and a failure there (a full disk) aborts the process; a failed call still marks it final.
        zip_writer, self._zip = self._zip, None
        if zip_writer is not None:
            try:
                zip_writer.write_end_of_file()
            except (RuntimeError, OSError):
                pass
        del zip_writer
        handle, self._file = self._file, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass
