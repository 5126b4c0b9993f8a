"""Tensor metadata: what is known about a tensor from headers alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

# safetensors dtype codes <-> torch dtypes (the codes are also used in plans and reports).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_ALIASES = {
    "fp16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "double": torch.float64,
    "long": torch.int64,
    "int": torch.int32,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn ``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"BF16"`` into a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    text = str(name).strip()
    if text in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[text]
    text = text.lower().removeprefix("torch.")
    if text in _ALIASES:
        return _ALIASES[text]
    candidate = getattr(torch, text, None)
    if isinstance(candidate, torch.dtype):
        return candidate
    raise ConfigError(
        f"unknown dtype {name!r}; use one of: "
        + ", ".join(sorted({str(d).removeprefix('torch.') for d in SAFETENSORS_DTYPES.values()}))
    )


def dtype_name(dtype: torch.dtype) -> str:
    """Short, stable name of a dtype (``float16``) for reports and fingerprints."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor, known before any of its bytes are read."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorMeta":
        return cls(tuple(tensor.shape), tensor.dtype)

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}{list(self.shape)}"


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary multiples), for reports."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
