"""GGUF writer: header and tensor infos at :meth:`GGUFWriter.begin`, tensor data as it arrives.

GGUF puts every tensor's name, shape, type and data offset in the header, in
front of the data.  The plan announces all output metas before the first tensor
arrives, so the whole header can be written up front and each tensor's bytes
written at its offset as :meth:`GGUFWriter.write` receives it: only one tensor
is ever held, however large the model.

The header is written by ``gguf.GGUFWriter`` (the llama.cpp project's own
Python writer): ``add_key_value`` and ``add_tensor_info`` for everything, then
``write_header_to_file`` / ``write_kv_data_to_file`` / ``write_ti_data_to_file``.
Its ``write_tensor_data`` is not used: it can only append tensors in header
order, whereas placing each tensor at the offset the header gives it (the
library's own layout: aligned start, each tensor padded to the alignment)
accepts tensors in any order, lets :meth:`GGUFWriter.write_raw` copy unchanged
tensors in the kernel, and gives the same bytes whatever the arrival order.

Computed tensors are stored unquantized in their own dtype: F32, F16, BF16,
F64, I8, I16, I32, I64.  A quantized tensor a plan carries unchanged (its meta
keeps a ``stored`` type such as Q4_K) is announced in that type and filled by
:meth:`GGUFWriter.write_raw` with the source's blocks, byte for byte.  Other dtypes (bool, unsigned ints, float8, complex) have no
GGUF type and are refused at :meth:`GGUFWriter.begin` with a
:class:`~statebridge.errors.ConfigError` naming the key; cast them first.
Shapes are written as ggml expects, fastest dimension first (``reversed`` of
the torch shape), so :class:`~statebridge.readers.gguf.GGUFSource`, ``gguf.GGUFReader``
and llama.cpp read back the torch shape.  ggml tensors have at most 4
dimensions, so larger ranks are refused too.

Metadata, later entries winning: ``general.architecture = "statebridge"``;
when the source is a GGUF file, every one of its key-value fields with its
stored type (:meth:`GGUFWriter.carry`: architecture, name, ``<arch>.*``
hyperparameters, tokenizer arrays...), except its ``statebridge.*`` fields and
with ``general.file_type`` kept when every quantized tensor kept its type
and no output was computed from a quantized one (``dequantized``), recomputed
for the tensors written otherwise; every
``metadata`` entry as a GGUF string (``general.alignment`` as the UINT32 the
format requires); then typed values given with ``fields=`` as
:class:`~statebridge.readers.gguf.GGUFField` values or plain Python values.  The
output holds no timestamps: the same inputs give the same bytes.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, LlamaFileType
from gguf import GGUFWriter as _LibWriter

from ..errors import ConfigError, ExecutionError
from ..tensors.provenance import is_reserved
from ..readers.base import RawSpan, Source
from ..readers.gguf import GGUFField, GGUFSource
from ..tensors.meta import DTYPES, DType, TensorMeta, dtype_name
from .base import PlannedFile, Writer
from .rawcopy import copy_spans

if TYPE_CHECKING:
    import torch

DEFAULT_ARCHITECTURE = "statebridge"
ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
FILE_TYPE_KEY = "general.file_type"
#: ggml's GGML_MAX_DIMS: llama.cpp refuses files with tensors of higher rank
MAX_DIMS = 4

#: the llama.cpp file type of a file whose most common tensor type is this (llama.cpp's own guess)
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
}

#: torch dtype -> (GGML type, numpy dtype of the same width used to hand the bytes to gguf)
GGUF_DTYPES: dict[DType, tuple[GGMLQuantizationType, np.dtype]] = {
    DTYPES["float32"]: (GGMLQuantizationType.F32, np.dtype(np.float32)),
    DTYPES["float16"]: (GGMLQuantizationType.F16, np.dtype(np.float16)),
    DTYPES["bfloat16"]: (GGMLQuantizationType.BF16, np.dtype(np.int16)),  # numpy has no bfloat16
    DTYPES["float64"]: (GGMLQuantizationType.F64, np.dtype(np.float64)),
    DTYPES["int8"]: (GGMLQuantizationType.I8, np.dtype(np.int8)),
    DTYPES["int16"]: (GGMLQuantizationType.I16, np.dtype(np.int16)),
    DTYPES["int32"]: (GGMLQuantizationType.I32, np.dtype(np.int32)),
    DTYPES["int64"]: (GGMLQuantizationType.I64, np.dtype(np.int64)),
}


class _FastArrays(_LibWriter):
    """``gguf.GGUFWriter`` packing arrays of numbers or strings in one go rather than item by item.

    The bytes are the library's own; a 262k-token vocabulary (Gemma's) packs in a fraction
    of a second instead of three, which was most of a rename's time.  Booleans and nested
    arrays still go through the library.
    """

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        fmt = self._simple_value_packing.get(sub_type) if sub_type is not None else None
        if vtype != GGUFValueType.ARRAY or not isinstance(val, list) or not val or sub_type == GGUFValueType.BOOL:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        order = "<" if self.endianess == GGUFEndian.LITTLE else ">"
        if sub_type == GGUFValueType.STRING:
            length = struct.Struct(order + "Q").pack
            body = bytearray()
            for item in val:
                encoded = item.encode("utf-8") if isinstance(item, str) else item
                body += length(len(encoded))
                body += encoded
        elif fmt is not None:
            body = struct.pack(f"{order}{len(val)}{fmt}", *val)
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack(order + "I", vtype) if add_vtype else b""
        return head + struct.pack(order + "IQ", sub_type, len(val)) + bytes(body)


class GGUFWriter(Writer):
    """Writes one ``.gguf`` file, streaming tensor data after an up-front header."""

    format: ClassVar[str] = "gguf"
    stores_quantized: ClassVar[bool] = True

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
        #: the source GGUF file's own fields (see :meth:`carry`); ``metadata`` and ``fields`` win over them
        self.carried: dict[str, GGUFField] = {}
        self._lib: _LibWriter | None = None
        self._file: BinaryIO = None  # type: ignore[assignment]  # the library's open file, once begun
        #: outputs computed in float from quantized inputs (set by ``trust.quantized.fit_types``): when there are
        #: none, the source's ``general.file_type`` (Q4_K_M, ...) still describes the file and is kept
        self.dequantized: list[str] = []
        self._metas: dict[str, TensorMeta] = {}
        self._nbytes: dict[str, int] = {}
        self._offsets: dict[str, int] = {}
        self._written: set[str] = set()
        self._data_start = self._end = 0

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return Path(target).suffix.lower() == ".gguf"

    def carry(self, source: Source) -> None:
        """Keep every key-value field of a source GGUF file, with its stored type, but its ``statebridge.*`` ones."""
        if isinstance(source, GGUFSource):
            self.carried = {k: f for k, f in source.typed_fields.items() if not is_reserved(k)}
        else:
            super().carry(source)

    def check(self, metas: Mapping[str, TensorMeta]) -> None:
        super().check(metas)
        for key, meta in metas.items():
            if meta.dtype not in GGUF_DTYPES:
                raise self.refuse(
                    key,
                    f"GGUF has no {dtype_name(meta.dtype)} type; cast it to one of "
                    + ", ".join(dtype_name(d) for d in GGUF_DTYPES),
                )
            if len(meta.shape) > MAX_DIMS:
                raise self.refuse(
                    key, f"its shape is {list(meta.shape)}, but ggml tensors have at most {MAX_DIMS} dimensions; reshape it first"
                )

    def layout(self, metas: Mapping[str, TensorMeta]) -> list[PlannedFile]:
        """One file; quantized tensors count at their stored size, as they will be written."""
        self.check(metas)
        return [PlannedFile(self.path.name, list(metas), sum(m.stored_nbytes for m in metas.values()))]

    # -- begin: validate, then header + key-values + tensor infos --------------------------------

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        if self._lib is not None:
            raise ExecutionError(f"{self.path}: begin() was called twice")
        if sys.byteorder != "little":  # pragma: no cover - tensors are written from memory as they are
            raise ConfigError(f"GGUF output {self.path}: writing GGUF on a big-endian machine is not supported")
        self.check(metas)

        kv = self._key_values(metas)
        arch = kv.pop(ARCHITECTURE_KEY)
        alignment = kv.pop(ALIGNMENT_KEY, None)
        # gguf's writer logs its file plan at INFO; that is noise in a statebridge run.
        gguf_logger = logging.getLogger("gguf")
        previous_level = gguf_logger.level
        gguf_logger.setLevel(logging.WARNING)
        try:
            lib = _FastArrays(None, str(arch.value if isinstance(arch, GGUFField) else arch))
            if alignment is not None:
                try:
                    lib.add_custom_alignment(int(alignment.value if isinstance(alignment, GGUFField) else alignment))
                except ValueError as e:
                    raise ConfigError(f"GGUF output {self.path}: bad {ALIGNMENT_KEY} {alignment!r}: {e}") from None
            for key, value in kv.items():
                self._add_key_value(lib, key, value)
            self._nbytes = {key: meta.stored_nbytes for key, meta in metas.items()}
            for key, meta in metas.items():
                np_dtype = GGUF_DTYPES[meta.dtype][1]
                lib.add_tensor_info(key, meta.shape, np_dtype, self._nbytes[key], raw_dtype=_ggml_type(meta))

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
        # Where each tensor's bytes go: gguf.GGUFWriter.write_ti_data_to_file gave tensor i the offset
        # sum(ggml_pad(nbytes_j, alignment) for j < i), relative to the aligned end of the tensor infos.
        assert lib.fout is not None
        self._file = lib.fout[0]
        self._data_start = lib.ggml_pad(self._file.tell(), lib.data_alignment)
        offset = 0
        self._offsets = {}
        for key in metas:
            self._offsets[key] = self._data_start + offset
            offset += lib.ggml_pad(self._nbytes[key], lib.data_alignment)
        self._end = self._data_start + offset
        self._metas = dict(metas)
        self._written = set()

    def _key_values(self, metas: Mapping[str, TensorMeta]) -> dict[str, Any]:
        """Architecture first (as llama.cpp writes it), then the source's fields, string metadata, typed fields."""
        kv: dict[str, Any] = {ARCHITECTURE_KEY: DEFAULT_ARCHITECTURE, **self.carried}
        carried_type = self.carried.get(FILE_TYPE_KEY)
        if carried_type is not None and (self.dequantized or not any(m.stored for m in metas.values())):
            # The source's file type described its tensors (Q4_K_M, ...); these are no longer all stored as they were.
            kv[FILE_TYPE_KEY] = GGUFField(_file_type(metas), carried_type.type)
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

    # -- tensor data, each at the offset its header entry names ----------------------------------

    def _slot(self, key: str) -> tuple[TensorMeta, int]:
        meta = self.announced(key, self._metas, self._written, started=self._lib is not None)
        return meta, self._offsets[key]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        import torch

        meta, offset = self._slot(key)
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ExecutionError(f"{self.path}: {key!r} is {TensorMeta.of(tensor)} but begin() announced {meta}")
        if meta.stored and not meta.encode:
            raise ExecutionError(f"{self.path}: {key!r} was announced as {meta.stored} blocks, which only write_raw can fill")
        if meta.nbytes:
            if meta.encode:  # a type a quantize step asked for: the gguf library's own blocks of the float values
                from gguf.quants import quantize

                data = quantize(tensor.detach().to("cpu").contiguous().numpy(), GGMLQuantizationType[meta.stored]).reshape(-1)
                if data.nbytes != self._nbytes[key]:
                    raise ExecutionError(f"{self.path}: {key!r} encoded to {data.nbytes} bytes of {meta.stored}, not {self._nbytes[key]}")
            else:
                # little-endian row-major bytes straight from the tensor's memory (x86/ARM hosts are little-endian)
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            try:
                self._file.seek(offset)
                self._file.write(memoryview(data))
            except OSError as e:
                raise ExecutionError(f"{self.path}: cannot write {key!r}: {e.strerror or e}") from None
        self._written.add(key)

    def write_raw(self, key: str, spans: Sequence[RawSpan]) -> bool:
        """Copy stored bytes (plain little-endian values or quantized blocks, as GGUF stores them) in the kernel."""
        meta, offset = self._slot(key)
        nbytes = self._nbytes[key]
        if sum(span.length for span in spans) != nbytes:
            return False
        if nbytes:
            try:
                self._file.flush()
                copy_spans(spans, self._file.fileno(), offset)
            except OSError as e:
                raise ExecutionError(f"{self.path}: cannot copy {key!r} from {spans[0].path}: {e.strerror or e}") from None
        self._written.add(key)
        return True

    # -- finish / abort --------------------------------------------------------------------------

    def finish(self) -> list[Path]:
        if self._lib is None:
            raise ExecutionError(f"{self.path}: finish() before begin()")
        missing = [k for k in self._metas if k not in self._written]
        if missing:
            raise ExecutionError(
                f"{self.path}: {len(missing)} announced tensors were never written, e.g. {missing[0]!r}"
            )
        lib, self._lib = self._lib, None
        # Padding between tensors was never written: the file system fills those gaps with zeros, and
        # truncate() makes the final padding (and the length) the same whatever order tensors came in.
        self._file.flush()
        self._file.truncate(self._end)
        self.sync(self._file.fileno())
        lib.close()
        return [self.path]

    def abort(self) -> None:
        lib, self._lib = self._lib, None
        if lib is not None:
            try:
                lib.close()
            except OSError:
                pass


def _file_type(metas: Mapping[str, TensorMeta]) -> int:
    """``general.file_type`` for these tensors, as llama.cpp guesses it: from the type most tensors have.

    Ties go to the type that reached the count first, in write order, as in llama.cpp; types without
    a file type of their own (F32, integers) give ``ALL_F32``, llama.cpp's fallback.
    """
    counts: dict[GGMLQuantizationType, int] = {}
    best, most = GGMLQuantizationType.F32, 0
    for meta in metas.values():
        ggml_type = _ggml_type(meta)
        counts[ggml_type] = counts.get(ggml_type, 0) + 1
        if counts[ggml_type] > most:
            best, most = ggml_type, counts[ggml_type]
    return int(FILE_TYPES.get(best, LlamaFileType.ALL_F32))


def _ggml_type(meta: TensorMeta) -> GGMLQuantizationType:
    """The GGML type a tensor is written in: its stored (quantized) type if it keeps one, else its dtype's."""
    return GGMLQuantizationType[meta.stored] if meta.stored else GGUF_DTYPES[meta.dtype][0]
