"""The ``quantize`` step: write matching tensors in a GGML type (Q8_0, Q4_0, F16, ...) that the config names.

A type change is never implied (issue 14): a tensor computed from a quantized input is
written in float unless a ``quantize`` step asks for a type.  The step computes the
values in float (a quantized input arrives dequantized by its reader) and marks the
output meta with the type (``TensorMeta(stored=..., encode=True)``); the GGUF writer
encodes them with ``gguf.quants.quantize``, so the blocks are the ``gguf`` library's own,
byte for byte.  F32, F16 and BF16 need no encoding: the output simply has that dtype,
which every format stores.  Block types exist only in GGUF: a plan that asks for one
and writes elsewhere is refused before any work (:func:`statebridge.trust.quantized.fit_types`).

Config form: the mapping of patterns to types itself, or ``{types: {...}, strict: false}``::

    - quantize: {"blk.*.ffn_down.weight": Q8_0, "token_embd.weight": F16}

A tensor matched by two patterns is an error (mapping order is not part of a
fingerprint); a second ``quantize`` step overrides a first.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import field_validator, model_validator

from ..errors import NotInvertibleError, PlanError
from ..tensors.meta import DTYPES, DType, TensorMeta
from ..tensors.patterns import KeyPattern
from .base import Group, Params, Transform
from .matching import select

#: GGML types that are plain dtypes: a quantize to one of them is a cast, which every format stores
FLOAT_TYPES: dict[str, DType] = {"F32": DTYPES["float32"], "F16": DTYPES["float16"], "BF16": DTYPES["bfloat16"]}


@cache
def encodable() -> tuple[str, ...]:
    """The GGML types the installed ``gguf`` library can encode from float values, by name.

    Asked of the library itself (one block of zeros each), so a newer ``gguf`` that learns
    a type makes it available without a change here.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    names = []
    for qtype in GGMLQuantizationType:
        block = GGML_QUANT_SIZES[qtype][0]
        try:
            quantize(np.zeros((1, block), dtype=np.float32), qtype)
        except NotImplementedError:
            continue
        names.append(qtype.name)
    return tuple(names)


def block_size(qtype: str) -> int:
    """How many values one block of ``qtype`` holds: a row's length must be a multiple of it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]


class Quantize(Transform):
    """Write matching tensors in a GGML type (``Q8_0``, ``Q4_0``, ``F16``, ...): computed in float, encoded by gguf."""

    name = "quantize"

    class Params(Params):
        types: dict[str, str]  # pattern -> GGML type name
        strict: bool = True  # a pattern that matches nothing is an error

        @model_validator(mode="before")
        @classmethod
        def _shorthand(cls, data: Any) -> Any:
            """``{pattern: type, ...}`` is ``{types: {pattern: type, ...}}``."""
            if isinstance(data, Mapping) and "types" not in data:
                return {"types": dict(data)}
            return data

        @field_validator("types")
        @classmethod
        def _known(cls, value: dict[str, str]) -> dict[str, str]:
            if not value:
                raise ValueError("name at least one pattern and its type, e.g. {\"blk.*.ffn_down.weight\": Q8_0}")
            can = encodable()
            checked = {}
            for pattern, qtype in value.items():
                KeyPattern(pattern).regex  # compile now: a regex typo is a config error
                name = qtype.strip().upper()
                if name not in can:
                    raise ValueError(f"{pattern!r}: the gguf library cannot encode {qtype!r}; it encodes {', '.join(can)}")
                checked[pattern] = name
            return checked

    def chosen(self, metas: Mapping[str, TensorMeta]) -> dict[str, str]:
        """key -> the type asked for it, in state order; a key two patterns match is an error."""
        by: dict[str, str] = {}
        for pattern in self.params.types:
            for key in select(pattern, metas, self.params.strict):
                if key in by:
                    raise PlanError(
                        f"{key!r} matches both {by[key]!r} and {pattern!r}; give each tensor one type "
                        "(a later quantize step may override an earlier one)"
                    )
                by[key] = pattern
        return {key: self.params.types[by[key]] for key in metas if key in by}

    def out_meta(self, key: str, meta: TensorMeta, qtype: str) -> TensorMeta:
        """The meta of ``key`` written in ``qtype``; refuses what the type cannot hold, naming the key."""
        if not meta.dtype.is_floating_point:
            raise PlanError(f"{key!r} ({meta}) is not floating point; only float tensors can be quantized")
        if qtype in FLOAT_TYPES:
            return TensorMeta(meta.shape, FLOAT_TYPES[qtype])
        block = block_size(qtype)
        if not meta.shape or meta.shape[-1] % block:
            raise PlanError(
                f"{key!r} ({meta}) cannot be stored as {qtype}: its last dimension must be a multiple of {block}"
            )
        return TensorMeta(meta.shape, FLOAT_TYPES["F32"], stored=qtype, encode=True)

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        groups = []
        for key, qtype in self.chosen(metas).items():
            meta = metas[key]
            out = self.out_meta(key, meta, qtype)
            if (out.stored, out.dtype) == (meta.stored, meta.dtype):  # already that type: carried as it is
                continue
            dtype = out.dtype
            groups.append(Group.map_one(key, key, out, lambda x, dtype=dtype: x.to(dtype.torch), f"quantize {qtype}"))
        return groups

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        types = ", ".join(sorted(set(self.params.types.values())))
        raise NotInvertibleError(f"quantize to {types} loses information; it has no inverse")
