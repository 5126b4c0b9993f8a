"""GGUF writer: header and tensor infos at :meth:`GGUFWriter.begin`, tensor data as it arrives.

GGUF puts every tensor's name, shape, type and data offset in the header, in
front of the data.  The plan announces all output metas before the first tensor
arrives, so the whole header can be written up front and each tensor's bytes
appended (padded to the alignment) as :meth:`GGUFWriter.write` receives it:
only one tensor is ever held, however large the model.

The format itself is written by ``gguf.GGUFWriter`` (the llama.cpp project's
own Python writer): ``add_tensor_info`` for every meta, then
``write_header_to_file`` / ``write_kv_data_to_file`` / ``write_ti_data_to_file``,
then one ``write_tensor_data`` per tensor.  That API lays tensors out in the
order their infos were added, so tensors must arrive in the order ``begin``
announced them (the executor's contract); anything else is an
:class:`~statebridge.errors.ExecutionError`.

Tensors are stored unquantized in their own dtype: F32, F16, BF16, F64, I8,
I16, I32, I64.  Other dtypes (bool, unsigned ints, float8, complex) have no
GGUF type and are refused at :meth:`GGUFWriter.begin` with a
:class:`~statebridge.errors.ConfigError` naming the key; cast them first.
Shapes are written as ggml expects, fastest dimension first (``reversed`` of
the torch shape), so :class:`~statebridge.io.gguf.GGUFSource`, ``gguf.GGUFReader``
and llama.cpp read back the torch shape.  ggml tensors have at most 4
dimensions, so larger ranks are refused too.

Metadata: every ``metadata`` entry is written as a GGUF string, except
``general.alignment``, which is written as the UINT32 the format requires.
``general.architecture`` defaults to ``"statebridge"``.  Typed values (for
example the fields of a source GGUF file, to be copied through unchanged) can
be given with ``fields=`` as :class:`~statebridge.io.gguf.GGUFField` values or
plain Python values.  The output holds no timestamps: the same inputs give the
same bytes.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf import GGUFWriter as _LibWriter

from ..errors import ConfigError, ExecutionError
from ..io.base import RawSpan
from ..io.gguf import GGUFField
from ..meta import TensorMeta, dtype_name
from .base import Writer

DEFAULT_ARCHITECTURE = "statebridge"
ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
#: ggml's GGML_MAX_DIMS: llama.cpp refuses files with tensors of higher rank
MAX_DIMS = 4

#: torch dtype -> (GGML type, numpy dtype of the same width used to hand the bytes to gguf)
GGUF_DTYPES: dict[torch.dtype, tuple[GGMLQuantizationType, np.dtype]] = {
    torch.float32: (GGMLQuantizationType.F32, np.dtype(np.float32)),
    torch.float16: (GGMLQuantizationType.F16, np.dtype(np.float16)),
    torch.bfloat16: (GGMLQuantizationType.BF16, np.dtype(np.int16)),  # numpy has no bfloat16
    torch.float64: (GGMLQuantizationType.F64, np.dtype(np.float64)),
    torch.int8: (GGMLQuantizationType.I8, np.dtype(np.int8)),
    torch.int16: (GGMLQuantizationType.I16, np.dtype(np.int16)),
    torch.int32: (GGMLQuantizationType.I32, np.dtype(np.int32)),
    torch.int64: (GGMLQuantizationType.I64, np.dtype(np.int64)),
}


class GGUFWriter(Writer):
    """Writes one ``.gguf`` file, streaming tensor data after an up-front header."""

    format: ClassVar[str] = "gguf"

    def __init__(
        self,
        path: Path,
        *,
        metadata: Mapping[str, str] | None = None,
        shard_size: int | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(path, metadata=metadata, shard_size=shard_size)
        #: typed key-value fields (``GGUFField`` or plain values); these win over ``metadata`` strings
        self.fields: dict[str, Any] = dict(fields or {})
        self._lib: _LibWriter | None = None
        self._order: list[str] = []
        self._metas: dict[str, TensorMeta] = {}
        self._next = 0

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return Path(target).suffix.lower() == ".gguf"

    # -- begin: validate, then header + key-values + tensor infos --------------------------------

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        if self._lib is not None:
            raise ExecutionError(f"{self.path}: begin() was called twice")
        for key, meta in metas.items():
            if meta.dtype not in GGUF_DTYPES:
                raise ConfigError(
                    f"cannot write {key!r} ({dtype_name(meta.dtype)}) to GGUF {self.path}: GGUF has no "
                    f"{dtype_name(meta.dtype)} type; cast it to one of "
                    + ", ".join(dtype_name(d) for d in GGUF_DTYPES)
                )
            if len(meta.shape) > MAX_DIMS:
                raise ConfigError(
                    f"cannot write {key!r} with shape {list(meta.shape)} to GGUF {self.path}: ggml tensors have "
                    f"at most {MAX_DIMS} dimensions; reshape it first"
                )

        kv = self._key_values()
        arch = kv.pop(ARCHITECTURE_KEY)
        alignment = kv.pop(ALIGNMENT_KEY, None)
        # gguf's writer logs its file plan at INFO; that is noise in a statebridge run.
        gguf_logger = logging.getLogger("gguf")
        previous_level = gguf_logger.level
        gguf_logger.setLevel(logging.WARNING)
        try:
            lib = _LibWriter(None, str(arch.value if isinstance(arch, GGUFField) else arch))
            if alignment is not None:
                try:
                    lib.add_custom_alignment(int(alignment.value if isinstance(alignment, GGUFField) else alignment))
                except ValueError as e:
                    raise ConfigError(f"GGUF output {self.path}: bad {ALIGNMENT_KEY} {alignment!r}: {e}") from None
            for key, value in kv.items():
                self._add_key_value(lib, key, value)
            for key, meta in metas.items():
                ggml_type, np_dtype = GGUF_DTYPES[meta.dtype]
                lib.add_tensor_info(key, meta.shape, np_dtype, meta.nbytes, raw_dtype=ggml_type)

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lib = lib
            try:
                lib.write_header_to_file(self.path)
                lib.write_kv_data_to_file()
                lib.write_ti_data_to_file()
            except (ValueError, TypeError, OverflowError, struct.error) as e:
                # a typed field whose value does not fit its type, a non-string where a string belongs, ...
                raise ConfigError(f"GGUF output {self.path}: cannot write the header: {e}") from None
        finally:
            gguf_logger.setLevel(previous_level)
        self._metas = dict(metas)
        self._order = list(metas)
        self._next = 0

    def _key_values(self) -> dict[str, Any]:
        """Architecture first (as llama.cpp writes it), then string metadata, then typed fields."""
        kv: dict[str, Any] = {ARCHITECTURE_KEY: DEFAULT_ARCHITECTURE}
        for key, value in self.metadata.items():
            kv[str(key)] = str(value)
        for key, value in self.fields.items():
            kv[str(key)] = value
        return kv

    def _add_key_value(self, lib: _LibWriter, key: str, value: Any) -> None:
        if isinstance(value, GGUFField):
            field = value
        else:
            try:
                vtype = GGUFValueType.get_type(value)
            except ValueError:
                raise ConfigError(
                    f"GGUF output {self.path}: metadata {key!r} is a {type(value).__name__}; "
                    "use str, int, float, bool or a list of one of them"
                ) from None
            sub_type = GGUFValueType.get_type(value[0]) if vtype == GGUFValueType.ARRAY and value else None
            if vtype == GGUFValueType.INT32 and not -(2**31) <= value < 2**31:
                vtype = GGUFValueType.INT64
            field = GGUFField(value, vtype, sub_type)
        if field.type == GGUFValueType.ARRAY and not field.value:
            raise ConfigError(f"GGUF output {self.path}: metadata {key!r} is an empty array, which gguf cannot write")
        # add_key_value, not add_string: the latter silently drops empty strings
        lib.add_key_value(key, field.value, field.type, sub_type=field.sub_type)

    # -- tensor data, in announced order -----------------------------------------------------------

    def _expect(self, key: str) -> TensorMeta:
        if self._lib is None:
            raise ExecutionError(f"{self.path}: write({key!r}) before begin()")
        if self._next >= len(self._order):
            raise ExecutionError(f"{self.path}: {key!r} arrived after every announced tensor was written")
        expected = self._order[self._next]
        if key != expected:
            raise ExecutionError(
                f"{self.path}: GGUF data is written in header order; expected {expected!r} next, got {key!r}"
            )
        return self._metas[key]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        meta = self._expect(key)
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ExecutionError(f"{self.path}: {key!r} is {TensorMeta.of(tensor)} but begin() announced {meta}")
        t = tensor.detach().to("cpu").contiguous()
        _, np_dtype = GGUF_DTYPES[meta.dtype]
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        array = t.numpy()
        assert array.dtype == np_dtype
        self._write_array(key, array.reshape(-1))

    def write_raw(self, key: str, span: RawSpan) -> bool:
        """Copy stored bytes (plain little-endian, as GGUF stores them) without decoding."""
        meta = self._expect(key)
        if span.length != meta.nbytes:
            return False
        if span.length == 0:
            self._write_array(key, np.empty(0, dtype=np.uint8))
            return True
        # A read-only map streams the bytes from the page cache; nothing is held on the heap.
        array = np.memmap(span.path, dtype=np.uint8, mode="r", offset=span.offset, shape=(span.length,))
        try:
            self._write_array(key, array)
        finally:
            del array
        return True

    def _write_array(self, key: str, array: np.ndarray) -> None:
        assert self._lib is not None
        try:
            self._lib.write_tensor_data(array)
        except OSError as e:
            raise ExecutionError(f"{self.path}: cannot write {key!r}: {e.strerror or e}") from None
        self._next += 1

    # -- finish / abort --------------------------------------------------------------------------

    def finish(self) -> list[Path]:
        if self._lib is None:
            raise ExecutionError(f"{self.path}: finish() before begin()")
        if self._next != len(self._order):
            missing = self._order[self._next :]
            raise ExecutionError(
                f"{self.path}: {len(missing)} announced tensors were never written, e.g. {missing[0]!r}"
            )
        lib, self._lib = self._lib, None
        assert lib.fout is not None
        for fout in lib.fout:
            fout.flush()
            os.fsync(fout.fileno())
        lib.close()
        return [self.path]

    def abort(self) -> None:
        lib, self._lib = self._lib, None
        if lib is not None:
            try:
                lib.close()
            except OSError:
                pass
