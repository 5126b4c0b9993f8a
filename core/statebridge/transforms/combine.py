"""Transforms that join tensors into one or part one into several: stack, unstack, concat, split, chunk.

Multi-key steps name their keys with patterns that share wildcards: the first
input anchors the match and its captures fill the other names, so
``inputs: [l.*.q.weight, l.*.k.weight, l.*.v.weight]`` with
``output: l.*.qkv.weight`` builds one group per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from ..errors import NotInvertibleError, PlanError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import KeyPattern
from .base import Group, Params, Piece, Pieces, Transform, whole
from .matching import bind, distinct, require

if TYPE_CHECKING:
    import torch


def _dim(dim: int, rank: int, key: str) -> int:
    if not -rank <= dim < rank:
        raise PlanError(f"{key!r} has {rank} dimensions; dim {dim} is out of range")
    return dim % rank


def _same(metas: Sequence[TensorMeta], keys: Sequence[str], what: str, skip_dim: int | None = None) -> None:
    first = metas[0]
    for key, meta in zip(keys[1:], metas[1:]):
        if meta.dtype != first.dtype:
            raise PlanError(f"cannot {what} {keys[0]!r} ({first}) with {key!r} ({meta}): dtypes differ")
        a = [d for i, d in enumerate(first.shape) if i != skip_dim]
        b = [d for i, d in enumerate(meta.shape) if i != skip_dim]
        if a != b or len(first.shape) != len(meta.shape):
            raise PlanError(f"cannot {what} {keys[0]!r} ({first}) with {key!r} ({meta}): shapes differ")


def _invertible_patterns(*patterns: str) -> None:
    if any(KeyPattern(p).is_regex for p in patterns):
        raise NotInvertibleError("steps written with re: patterns have no automatic inverse; use glob patterns")


class _ManyToOne(Params):
    inputs: list[str] = Field(min_length=1)
    output: str
    dim: int = 0
    strict: bool = True


class _OneToMany(Params):
    input: str
    outputs: list[str] = Field(min_length=1)
    dim: int = 0
    strict: bool = True


class _Join(Transform):
    """Many tensors -> one (the planning shared by stack and concat)."""

    Params = _ManyToOne

    def joined(self, keys: list[str], parts: list[TensorMeta]) -> tuple[int, tuple[int, ...]]:
        """The normalised ``dim`` and the joined shape, or a PlanError naming the keys."""
        raise NotImplementedError

    def join(self, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        p = self.params
        groups = []
        for first, (*rest, output) in bind(p.inputs[0], [*p.inputs[1:], p.output], metas, p.strict):
            keys = [first, *rest]
            distinct(keys, f"the inputs of {output!r}")
            require(keys, metas, f"joined into {output!r} by {self.name}")
            parts = [metas[k] for k in keys]
            dim, shape = self.joined(keys, parts)
            # Joined along the outermost non-trivial dimension, the result is its parts' bytes end to end.
            pieces = {output: tuple(p for k, m in zip(keys, parts) for p in whole(k, m))} if math.prod(shape[:dim]) == 1 else None
            groups.append(
                Group(
                    inputs=tuple(keys),
                    outputs={output: TensorMeta(shape, parts[0].dtype)},
                    compute=lambda t, keys=tuple(keys), output=output, dim=dim: {output: self.join([t[k] for k in keys], dim)},
                    ops=(f"{self.name}(dim={dim})",),
                    pieces=pieces,
                )
            )
        return groups


class _Part(Transform):
    """One tensor -> many (the planning shared by unstack, split and chunk)."""

    Params = _OneToMany

    def parts(self, source: str, meta: TensorMeta, dim: int, n: int) -> list[tuple[int, ...]]:
        """The shapes of the ``n`` parts, or a PlanError naming the source."""
        raise NotImplementedError

    def part(self, tensor: torch.Tensor, dim: int, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def describe(self, dim: int, shapes: list[tuple[int, ...]]) -> str:
        return f"{self.name}(dim={dim})"

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        p = self.params
        groups = []
        for source, outputs in bind(p.input, p.outputs, metas, p.strict):
            distinct(outputs, f"the outputs of {source!r}")
            meta = metas[source]
            dim = _dim(p.dim, len(meta.shape), source)
            shapes = self.parts(source, meta, dim, len(outputs))
            metas_out = {o: TensorMeta(shape, meta.dtype) for o, shape in zip(outputs, shapes)}
            groups.append(
                Group(
                    inputs=(source,),
                    outputs=metas_out,
                    compute=lambda t, s=source, outs=tuple(outputs), dim=dim, shapes=shapes: {
                        o: x.contiguous() for o, x in zip(outs, self.part(t[s], dim, shapes))
                    },
                    ops=(self.describe(dim, shapes),),
                    pieces=_consecutive(source, metas_out) if math.prod(meta.shape[:dim]) == 1 else None,
                )
            )
        return groups


def _consecutive(source: str, parts: Mapping[str, TensorMeta]) -> dict[str, Pieces]:
    """Parts cut along the outermost non-trivial dimension: consecutive byte ranges of ``source``."""
    pieces, offset = {}, 0
    for key, meta in parts.items():
        pieces[key] = (Piece(source, offset, meta.nbytes),)
        offset += meta.nbytes
    return pieces


class Stack(_Join):
    """Stack equal-shaped tensors along a new dimension ``dim``."""
    name = "stack"

    def joined(self, keys: list[str], parts: list[TensorMeta]) -> tuple[int, tuple[int, ...]]:
        _same(parts, keys, "stack")
        dim = _dim(self.params.dim, len(parts[0].shape) + 1, keys[0])
        shape = list(parts[0].shape)
        shape.insert(dim, len(keys))
        return dim, tuple(shape)

    def join(self, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        import torch

        return torch.stack(tensors, dim)

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        _invertible_patterns(*self.params.inputs, self.params.output)
        return Unstack(input=self.params.output, outputs=self.params.inputs, dim=self.params.dim, strict=self.params.strict)


class Unstack(_Part):
    """Split a tensor along ``dim`` into one tensor per output, removing that dimension."""
    name = "unstack"

    def parts(self, source: str, meta: TensorMeta, dim: int, n: int) -> list[tuple[int, ...]]:
        if meta.shape[dim] != n:
            raise PlanError(f"{source!r} ({meta}) has {meta.shape[dim]} entries along dim {dim}, not {n}")
        return [meta.shape[:dim] + meta.shape[dim + 1 :]] * n

    def part(self, tensor: torch.Tensor, dim: int, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
        import torch

        return torch.unbind(tensor, dim)

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        _invertible_patterns(self.params.input, *self.params.outputs)
        return Stack(inputs=self.params.outputs, output=self.params.input, dim=self.params.dim, strict=self.params.strict)


class Concat(_Join):
    """Concatenate tensors along an existing dimension ``dim`` (e.g. q, k, v -> fused qkv)."""
    name = "concat"

    def joined(self, keys: list[str], parts: list[TensorMeta]) -> tuple[int, tuple[int, ...]]:
        dim = _dim(self.params.dim, len(parts[0].shape), keys[0])
        _same(parts, keys, "concatenate", skip_dim=dim)
        shape = list(parts[0].shape)
        shape[dim] = sum(m.shape[dim] for m in parts)
        return dim, tuple(shape)

    def join(self, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        import torch

        return torch.cat(tensors, dim)

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        p = self.params
        _invertible_patterns(*p.inputs, p.output)
        size_sets = {tuple(metas[k].shape[p.dim] for k in g.inputs) for g in self.plan(metas)}
        if len(size_sets) != 1:
            raise NotInvertibleError(f"concat into {p.output!r} joined parts of different sizes in different groups")
        return Split(input=p.output, outputs=p.inputs, dim=p.dim, sizes=list(size_sets.pop()), strict=p.strict)


class Split(_Part):
    """Cut a tensor along ``dim`` into parts of the given ``sizes`` (equal parts when omitted)."""
    name = "split"

    class Params(_OneToMany):
        sizes: list[int] | None = None

        @model_validator(mode="after")
        def _sizes_match(self) -> "Split.Params":
            if self.sizes is not None and len(self.sizes) != len(self.outputs):
                raise ValueError(f"{len(self.sizes)} sizes for {len(self.outputs)} outputs")
            return self

    def parts(self, source: str, meta: TensorMeta, dim: int, n: int) -> list[tuple[int, ...]]:
        total = meta.shape[dim]
        sizes = getattr(self.params, "sizes", None)
        if sizes is None:
            if total % n:
                raise PlanError(f"{source!r} ({meta}) has {total} entries along dim {dim}, not divisible into {n} parts")
            sizes = [total // n] * n
        elif sum(sizes) != total:
            raise PlanError(f"sizes {sizes} add up to {sum(sizes)}, but {source!r} ({meta}) has {total} along dim {dim}")
        return [meta.shape[:dim] + (size,) + meta.shape[dim + 1 :] for size in sizes]

    def part(self, tensor: torch.Tensor, dim: int, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
        import torch

        return torch.split(tensor, [shape[dim] for shape in shapes], dim)

    def describe(self, dim: int, shapes: list[tuple[int, ...]]) -> str:
        return f"{self.name}(dim={dim}, sizes={[shape[dim] for shape in shapes]})"

    def inverse(self, metas: Mapping[str, TensorMeta]) -> Transform:
        _invertible_patterns(self.params.input, *self.params.outputs)
        return Concat(inputs=self.params.outputs, output=self.params.input, dim=self.params.dim, strict=self.params.strict)


class Chunk(Split):
    """Cut a tensor along ``dim`` into equal parts, one per output (``torch.chunk`` without remainders)."""
    name = "chunk"

    Params = _OneToMany
