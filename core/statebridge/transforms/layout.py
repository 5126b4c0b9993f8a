"""Transforms that rearrange one tensor's elements: transpose, permute, reshape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pydantic import Field

from ..errors import NotInvertibleError, PlanError
from ..tensors.meta import TensorMeta
from .base import Group, Params, Transform, whole
from .matching import select


class _PerKey(Transform):
    """A transform applied to every key matching ``pattern``, one group per key, name kept."""

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        raise NotImplementedError

    def fn(self, key: str, meta: TensorMeta):
        raise NotImplementedError

    #: whether the output has exactly the input's bytes (then writers copy them without decoding)
    same_bytes = False

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.model_dump(exclude={"pattern", "strict"}).items())
        return f"{self.name}({args})"

    def keys(self, metas: Mapping[str, TensorMeta]) -> list[str]:
        return select(self.params.pattern, metas, self.params.strict)

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        groups = []
        for key in self.keys(metas):
            group = Group.map_one(key, key, self.out_meta(key, metas[key]), self.fn(key, metas[key]), self.describe())
            groups.append(replace(group, pieces={key: whole(key, metas[key])}) if self.same_bytes else group)
        return groups


class _PatternParams(Params):
    pattern: str
    strict: bool = True


class Transpose(_PerKey):
    """Swap two dimensions (default the first two) of every matching tensor."""
    name = "transpose"

    class Params(_PatternParams):
        dims: tuple[int, int] = (0, 1)

    def _dims(self, key: str, meta: TensorMeta) -> tuple[int, int]:
        rank = len(meta.shape)
        a, b = self.params.dims
        if not (-rank <= a < rank and -rank <= b < rank):
            raise PlanError(f"cannot transpose dims {self.params.dims} of {key!r} ({meta})")
        return a % rank, b % rank

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        a, b = self._dims(key, meta)
        shape = list(meta.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return TensorMeta(tuple(shape), meta.dtype)

    def fn(self, key: str, meta: TensorMeta):
        a, b = self._dims(key, meta)
        return lambda x: x.transpose(a, b).contiguous()

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        return self


class Permute(_PerKey):
    """Reorder the dimensions of every matching tensor (``dims`` as in ``torch.permute``)."""
    name = "permute"

    class Params(_PatternParams):
        dims: list[int] = Field(min_length=1)

    def _dims(self, key: str, meta: TensorMeta) -> list[int]:
        rank = len(meta.shape)
        dims = [d % rank if -rank <= d < rank else -1 for d in self.params.dims]
        if sorted(dims) != list(range(rank)):
            raise PlanError(f"dims {self.params.dims} are not a permutation of the {rank} dimensions of {key!r} ({meta})")
        return dims

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        return TensorMeta(tuple(meta.shape[d] for d in self._dims(key, meta)), meta.dtype)

    def fn(self, key: str, meta: TensorMeta):
        dims = self._dims(key, meta)
        return lambda x: x.permute(dims).contiguous()

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        dims = [d % len(self.params.dims) for d in self.params.dims]
        inverse = [dims.index(i) for i in range(len(dims))]
        return Permute(pattern=self.params.pattern, dims=inverse, strict=self.params.strict)


class Reshape(_PerKey):
    """Give every matching tensor a new shape with the same number of elements (one -1 allowed)."""
    name = "reshape"

    same_bytes = True  # row-major bytes do not move

    class Params(_PatternParams):
        shape: list[int]

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        shape = list(self.params.shape)
        if shape.count(-1) > 1 or any(d < -1 for d in shape):
            raise PlanError(f"shape {shape}: at most one -1 and no other negative sizes")
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        if -1 in shape:
            if known == 0 or meta.numel % known:
                raise PlanError(f"cannot reshape {key!r} ({meta}) to {self.params.shape}")
            shape[shape.index(-1)] = meta.numel // known
        if known * (shape[self.params.shape.index(-1)] if -1 in self.params.shape else 1) != meta.numel:
            raise PlanError(f"cannot reshape {key!r} ({meta}) to {self.params.shape}: element counts differ")
        return TensorMeta(tuple(shape), meta.dtype)

    def fn(self, key: str, meta: TensorMeta):
        shape = self.out_meta(key, meta).shape
        return lambda x: x.reshape(shape).contiguous()

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        shapes = {metas[k].shape for k in self.keys(metas)}
        if not shapes:  # strict=False and nothing matched: nothing to undo
            return Reshape(pattern=self.params.pattern, shape=list(self.params.shape), strict=False)
        if len(shapes) != 1:
            raise NotInvertibleError(f"reshape {self.params.pattern!r} matched tensors of {len(shapes)} different shapes")
        return Reshape(pattern=self.params.pattern, shape=list(shapes.pop()), strict=self.params.strict)
