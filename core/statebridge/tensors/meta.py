"""Tensor metadata: what is known about a tensor from headers alone.

Element types are :class:`DType` values, named without importing torch: planning,
inspecting and raw byte copies read headers only, so they never pay for torch (whose
import alone costs about 220 MB of memory and over a second). ``DType.torch`` gives the
torch dtype where tensor data is touched, and a ``DType`` compares equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class DType:
    """An element type by torch's name (``float16``), with what plans need to know of it."""

    name: str
    itemsize: int
    is_floating_point: bool
    #: the safetensors code (``F16``), or None where safetensors cannot store the type
    code: str | None = None

    @property
    def torch(self) -> "torch.dtype":
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)

    @classmethod
    def of(cls, dtype: "DType | torch.dtype | str") -> "DType":
        """The DType of a torch dtype, or of a name that :func:`parse_dtype` accepts."""
        if isinstance(dtype, DType):
            return dtype
        if isinstance(dtype, str):
            return parse_dtype(dtype)
        name = str(dtype).removeprefix("torch.")
        known = DTYPES.get(name)
        if known is not None:
            return known
        if not hasattr(dtype, "itemsize") or not hasattr(dtype, "is_floating_point"):
            raise TypeError(f"not a dtype: {dtype!r}")
        return cls(name, dtype.itemsize, dtype.is_floating_point)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, DType):
            return self.name == other.name
        if type(other).__module__ == "torch" and type(other).__name__ == "dtype":
            return str(other) == f"torch.{self.name}"
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name!r})"


def _known(*dtypes: DType) -> dict[str, DType]:
    return {d.name: d for d in dtypes}


#: every dtype statebridge reads from headers, by torch's name
DTYPES: dict[str, DType] = _known(
    DType("bool", 1, False, "BOOL"),
    DType("uint8", 1, False, "U8"),
    DType("int8", 1, False, "I8"),
    DType("int16", 2, False, "I16"),
    DType("uint16", 2, False, "U16"),
    DType("int32", 4, False, "I32"),
    DType("uint32", 4, False, "U32"),
    DType("int64", 8, False, "I64"),
    DType("uint64", 8, False, "U64"),
    DType("float16", 2, True, "F16"),
    DType("bfloat16", 2, True, "BF16"),
    DType("float32", 4, True, "F32"),
    DType("float64", 8, True, "F64"),
    DType("float8_e4m3fn", 1, True, "F8_E4M3"),
    DType("float8_e5m2", 1, True, "F8_E5M2"),
)
#: safetensors dtype codes -> DType (the codes are also used in plans and reports)
SAFETENSORS_DTYPES: dict[str, DType] = {d.code: d for d in DTYPES.values() if d.code}

_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "long": "int64",
    "int": "int32",
}


def parse_dtype(name: "str | DType | torch.dtype") -> DType:
    """Turn ``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``, ``"BF16"`` or a torch dtype into a DType."""
    if not isinstance(name, str):
        return DType.of(name)
    text = name.strip()
    if text in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[text]
    text = text.lower().removeprefix("torch.")
    text = _ALIASES.get(text, text)
    if text in DTYPES:
        return DTYPES[text]
    raise ConfigError(f"unknown dtype {name!r}; use one of: " + ", ".join(sorted(DTYPES)))


def dtype_name(dtype: "DType | torch.dtype") -> str:
    """Short, stable name of a dtype (``float16``) for reports and fingerprints."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of one tensor, known before any of its bytes are read.

    ``dtype`` may be given as a torch dtype or a name; it is kept as a :class:`DType`.

    ``stored`` names the block-quantized type a source keeps the bytes in (a GGML type
    such as ``"Q4_K"``) when that is not ``dtype`` itself; loading such a tensor gives
    its values dequantized to ``dtype``.  It is part of equality and hash, so a tensor
    carried unchanged (its meta passed along by a rename) keeps it and can be copied as
    its raw blocks into a format that has the type, while a tensor a step computes gets
    a fresh meta without it and is written in ``dtype``.

    ``encode`` marks a ``stored`` type that a step asked for (``quantize``) rather than
    one a source holds: the values are computed in ``dtype`` and a writer that stores the
    type encodes them into it; such a meta is kept whatever the group that made it.
    """

    shape: tuple[int, ...]
    dtype: DType
    stored: str | None = None
    encode: bool = False
    #: element count and bytes in ``dtype``, computed once: planning asks for them per tensor, often
    numel: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, DType):
            object.__setattr__(self, "dtype", DType.of(self.dtype))
        numel = math.prod(self.shape)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "nbytes", numel * self.dtype.itemsize)

    @property
    def stored_nbytes(self) -> int:
        """Bytes the tensor takes as stored: whole blocks of its ``stored`` type, else :attr:`nbytes`."""
        if not self.stored:
            return self.nbytes
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # numpy only, no torch

        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[self.stored]]
        return self.numel // block_size * type_size

    @classmethod
    def of(cls, tensor: "torch.Tensor") -> "TensorMeta":
        return cls(tuple(tensor.shape), DType.of(tensor.dtype))

    def __str__(self) -> str:
        stored = f" ({'quantized to' if self.encode else 'stored'} {self.stored})" if self.stored else ""
        return f"{dtype_name(self.dtype)}{list(self.shape)}{stored}"


def human_bytes(n: float) -> str:
    """``1500`` -> ``"1.5 KB"``, for reports: decimal units, as sizes are written (``2GB`` is 2·10⁹ bytes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
