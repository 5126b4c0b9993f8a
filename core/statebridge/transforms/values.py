"""Transforms that change tensor values: cast, and the opt-in value operations.

Value operations are never implied: each runs only where a step names it, and
every key it touches appears in the plan's lineage (``statebridge plan`` lists them).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, create_model, field_validator, model_validator

from ..errors import NotInvertibleError, PlanError
from ..tensors.meta import DTYPES, DType, TensorMeta, dtype_name, parse_dtype
from ..tensors.patterns import describe_keys
from .base import Transform, format_validation_error
from .composite import Pipeline
from .layout import _PatternParams, _PerKey
from .matching import exact_pattern

if TYPE_CHECKING:
    import torch


class Cast(_PerKey):
    """Convert matching tensors to ``dtype``; only floating-point ones unless ``integers: true``."""
    name = "cast"

    class Params(_PatternParams):
        pattern: str = "**"
        dtype: str
        integers: bool = False  # also cast integer/bool tensors (e.g. position_ids); off by default
        strict: bool = False

        @field_validator("dtype")
        @classmethod
        def _known(cls, value: str) -> str:
            return dtype_name(parse_dtype(value))

    @property
    def dtype(self) -> DType:
        return parse_dtype(self.params.dtype)

    def keys(self, metas: Mapping[str, TensorMeta]) -> list[str]:
        return [
            k
            for k in super().keys(metas)
            if metas[k].dtype != self.dtype and (self.params.integers or metas[k].dtype.is_floating_point)
        ]

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        return TensorMeta(meta.shape, self.dtype)

    def fn(self, key: str, meta: TensorMeta):
        dtype = self.dtype
        return lambda x: x.to(dtype.torch)

    def config_edits(self, metas: Mapping[str, TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """``dtype`` / ``torch_dtype`` become the new dtype when, after this step, every floating tensor has it.

        A cast that leaves some floating tensors in another dtype edits nothing (the
        config cannot say "mostly"). In a ``scope``, "every" means the scope's tensors.
        """
        if not self.dtype.is_floating_point:
            return {}
        cast = set(self.keys(metas))
        floating = [k for k, m in metas.items() if m.dtype.is_floating_point]
        if not floating or any(k not in cast and metas[k].dtype != self.dtype for k in floating):
            return {}
        return _dtype_edits(config, self.params.dtype, top=True)

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        """Casts back exactly the tensors this cast changed, each to the dtype it had.

        A tensor already in the target dtype was left alone, so the inverse must
        leave it alone too: where the pattern would also match such a tensor (or
        one of another original dtype), the inverse names its keys one by one.
        """
        changed = self.keys(metas)
        by_dtype: dict[DType, list[str]] = {}
        for key in changed:
            by_dtype.setdefault(metas[key].dtype, []).append(key)
        for source, keys in by_dtype.items():
            if not _widens(source, self.dtype):
                raise NotInvertibleError(f"cast {dtype_name(source)} -> {self.params.dtype} loses information ({describe_keys(keys)})")
        touched = set(changed)
        after = {k: self.out_meta(k, m) if k in touched else m for k, m in metas.items()}
        integers = not self.dtype.is_floating_point  # the inverse reads tensors of this cast's dtype
        back: list[Transform] = []
        for source, keys in by_dtype.items():
            cast = Cast(pattern=self.params.pattern, dtype=dtype_name(source), integers=integers, strict=False)
            if cast.keys(after) == keys:
                back.append(cast)
            else:
                back.extend(Cast(pattern=exact_pattern(k), dtype=dtype_name(source), integers=integers) for k in keys)
        return back[0] if len(back) == 1 else Pipeline(back)


#: the keys under which transformers records a model's dtype (``torch_dtype`` before 4.56, ``dtype`` since)
DTYPE_KEYS = ("dtype", "torch_dtype")


def _dtype_edits(config: Mapping[str, Any], name: str, top: bool) -> dict[str, Any]:
    """Edits setting every dtype key of ``config`` and of its nested configs (``text_config``, ...) to ``name``.

    A config that records no dtype gets ``torch_dtype``, which every transformers version reads.
    """
    edits: dict[str, Any] = {}
    for key, value in config.items():
        if key in DTYPE_KEYS:
            if value != name:
                edits[key] = name
        elif isinstance(value, Mapping):
            nested = _dtype_edits(value, name, top=False)
            if nested:
                edits[key] = {**value, **nested}
    if top and not any(key in config for key in DTYPE_KEYS):
        edits["torch_dtype"] = name
    return edits


#: exponent and mantissa bits of the floating-point formats a cast can invert
_FLOAT_BITS = {
    "float8_e4m3fn": (4, 3),
    "float8_e5m2": (5, 2),
    "float16": (5, 10),
    "bfloat16": (8, 7),
    "float32": (8, 23),
    "float64": (11, 52),
}

_INTEGER = re.compile(r"(u?)int(\d+)")


def _widens(src: DType, dst: DType) -> bool:
    """Whether every value of ``src`` is exactly representable in ``dst`` (decided from names, without torch)."""
    if src.name in _FLOAT_BITS and dst.name in _FLOAT_BITS:
        (src_exponent, src_mantissa), (dst_exponent, dst_mantissa) = _FLOAT_BITS[src.name], _FLOAT_BITS[dst.name]
        return dst_exponent >= src_exponent and dst_mantissa >= src_mantissa
    s, d = _INTEGER.fullmatch(src.name), _INTEGER.fullmatch(dst.name)
    if s is None or d is None:
        return False  # bool, complex, or a float meeting an integer
    src_signed, src_bits, dst_signed, dst_bits = not s[1], int(s[2]), not d[1], int(d[2])
    if src_signed and not dst_signed:
        return False
    return dst_bits > src_bits if dst_signed and not src_signed else dst_bits >= src_bits


def _number(value: Any) -> Any:
    if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans; never a factor
        raise ValueError(f"{value!r} is a boolean, not a number")
    return value


#: a number: ints, floats and numbers written as strings are accepted, because YAML 1.1 (PyYAML)
#: reads ``1e-3`` as the string "1e-3" and a quoted "2" is still plainly a number; ``.nan`` and
#: ``.inf`` are numbers too (the ``finite`` gate is there to refuse what they produce)
Number = Annotated[float, BeforeValidator(_number)]


def _scale(x: torch.Tensor, factor: Number) -> torch.Tensor:
    return x * factor


def _add(x: torch.Tensor, value: Number) -> torch.Tensor:
    return x + value


def _clamp(x: torch.Tensor, min: Number | None = None, max: Number | None = None) -> torch.Tensor:
    return x.clamp(min=min, max=max)


def _fill(x: torch.Tensor, value: Number) -> torch.Tensor:
    return x.new_full(x.shape, value)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape)


#: op name -> function(tensor, **args); each op's ``args`` are validated by a schema built from its signature
VALUE_OPS: dict[str, Callable[..., "torch.Tensor"]] = {"scale": _scale, "add": _add, "clamp": _clamp, "fill": _fill, "zero": _zero}


def _args_schema(name: str, op: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of ``op``'s keyword arguments (all but the tensor), from its annotations and defaults."""
    params = list(inspect.signature(op).parameters.values())[1:]
    # the annotations are strings (postponed evaluation); only the arguments' are evaluated, since the
    # tensor's names torch, which planning never imports
    fields: dict[str, Any] = {
        p.name: (eval(p.annotation, globals()) if isinstance(p.annotation, str) else p.annotation, ... if p.default is p.empty else p.default)
        for p in params
    }
    return create_model(f"{name}_args", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


_ARGS: dict[str, type[BaseModel]] = {name: _args_schema(name, op) for name, op in VALUE_OPS.items()}


class ValueOp(_PerKey):
    """Apply a named arithmetic op (scale, add, clamp, fill, zero) to matching floating-point tensors.

    The op runs in float32 (or float64 for float64 tensors) and the result is
    cast back to the tensor's dtype, so shapes and dtypes never change.
    """
    name = "value_op"

    class Params(_PatternParams):
        op: Literal["scale", "add", "clamp", "fill", "zero"]
        args: dict[str, Any] = {}

        @model_validator(mode="before")
        @classmethod
        def _args_fit(cls, data: Any) -> Any:
            """Validate ``args`` by the op's own schema now, so a bad argument is a config error, not a run-time one."""
            op = data.get("op") if isinstance(data, Mapping) else None
            args = data.get("args", {}) if isinstance(data, Mapping) else None
            if not isinstance(op, str) or op not in _ARGS or not isinstance(args, Mapping | None):
                return data  # the fields' own validation names what is wrong
            schema = _ARGS[op]
            try:
                checked = schema.model_validate(args or {})
            except ValidationError as e:
                takes = ", ".join(schema.model_fields) or "no arguments"
                raise ValueError(f"op {op!r} takes {takes}: {format_validation_error(e, 'args')}") from None
            return {**data, "args": checked.model_dump(exclude_unset=True)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.params.args.items()))
        return f"{self.params.op}({args})"

    def keys(self, metas: Mapping[str, TensorMeta]) -> list[str]:
        keys = super().keys(metas)
        for key in keys:
            if not metas[key].dtype.is_floating_point:
                raise PlanError(f"value op {self.params.op!r} matched {key!r} ({metas[key]}), which is not floating point")
        return keys

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        return meta

    def fn(self, key: str, meta: TensorMeta):
        op, args = VALUE_OPS[self.params.op], self.params.args
        work = DTYPES["float64" if meta.dtype.name == "float64" else "float32"]
        return lambda x: op(x.to(work.torch), **args).to(meta.dtype.torch)

