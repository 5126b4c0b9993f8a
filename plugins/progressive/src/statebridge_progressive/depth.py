"""The ``grow_depth`` transform: more blocks, laid out from the existing ones, planned from headers.

Three methods give the new stack as a list of source blocks:

- ``llama_pro`` (LLaMA-Pro's block expansion): ``num_layers: N`` for a model of ``L`` blocks
  inserts ``N - L`` copies, one after every ``L / (N - L)``-th block (spread evenly when that
  is not a whole number), whose output projections (``o_proj`` and ``down_proj`` by default,
  ``zero`` for other names) are zero.  A pre-norm residual block whose output projections are
  zero adds nothing to the residual stream, so the grown model computes exactly the same
  function, bit for bit, and the copies train from a useful start.
- ``slices`` (SOLAR's depth up-scaling): the new stack is the given ranges of blocks laid end
  to end, ``[[0, 24], [8, 32]]``; blocks in no slice are dropped (the plan lists them).
- ``duplicate``: each block in ``indices`` is followed by a copy of itself, optionally with
  seeded Gaussian noise (``noise_std``) to break the symmetry between the two.

Every tensor of a block that keeps its bytes is a raw copy (a rename, or several outputs from
one read) and zeroed tensors are written as zero bytes (``Group.zeros``), so a ``llama_pro`` or
``slices`` run never imports torch; only noisy copies are computed.  ``config.json`` gets the new block
count and every per-layer list re-indexed (:func:`~statebridge_progressive.layers.per_layer_edits`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

import statebridge as sb
from statebridge.transforms.base import whole

from .layers import Stack, find_stack, per_layer_edits, sb_range
from .tprog import RecordsGrowth

if TYPE_CHECKING:
    import torch

#: what a new block is: its source's bytes, a copy with zeroed output projections, or a copy with noise
Kind = Literal["copy", "zeroed", "noisy"]


class GrowDepth(RecordsGrowth):
    """Grow the stack of numbered blocks by LLaMA-Pro expansion, SOLAR slices or duplication."""

    name = "grow_depth"

    class Params(sb.Params):
        method: Literal["llama_pro", "slices", "duplicate"]
        num_layers: int | None = None  # llama_pro: the number of blocks after growing
        slices: list[tuple[int, int]] | None = None  # slices: [start, end) ranges of blocks, laid end to end
        indices: list[int] | None = None  # duplicate: blocks followed by a copy (one copy per mention)
        noise_std: float = 0.0  # duplicate: standard deviation of the Gaussian noise added to the copies
        seed: int = 0  # of that noise
        zero: list[str] = ["o_proj", "down_proj"]  # llama_pro: the modules whose weights (and biases) are zero in a copy
        prefix: str | None = None  # the blocks' prefix ('model.layers'); found from the names when there is one stack

        @model_validator(mode="after")
        def _method_fields(self) -> "GrowDepth.Params":
            needs = {"llama_pro": "num_layers", "slices": "slices", "duplicate": "indices"}
            for method, field in needs.items():
                given = getattr(self, field) is not None
                if method == self.method and not given:
                    raise ValueError(f"method {method!r} needs {field!r}")
                if method != self.method and given:
                    raise ValueError(f"{field!r} belongs to method {method!r}, not {self.method!r}")
            if self.noise_std and self.method != "duplicate":
                raise ValueError("noise_std applies to method 'duplicate' (llama_pro copies must stay exact)")
            if self.noise_std < 0:
                raise ValueError("noise_std must not be negative")
            if self.method == "llama_pro" and not self.zero:
                raise ValueError("llama_pro needs the modules to zero ('zero'), or the copies change the function")
            return self

    def layout(self, count: int) -> list[tuple[int, Kind]]:
        """The new stack: for each new block, its source block and what it is."""
        p = self.params
        if p.method == "llama_pro":
            added = p.num_layers - count
            if added <= 0:
                raise sb.PlanError(f"num_layers {p.num_layers} does not grow a model of {count} blocks")
            # after block ((j + 1) * L) // added - 1 for each copy j: every L/added-th block, as LLaMA-Pro
            after = [((j + 1) * count) // added - 1 for j in range(added)]
            out: list[tuple[int, Kind]] = []
            for i in range(count):
                out.append((i, "copy"))
                out.extend((i, "zeroed") for _ in range(after.count(i)))
            return out
        if p.method == "slices":
            out = []
            for start, end in p.slices:
                if not 0 <= start < end <= count:
                    raise sb.PlanError(f"slice [{start}, {end}] is not a range of blocks 0..{count} (end exclusive)")
                out.extend((i, "copy") for i in range(start, end))
            return out
        bad = [i for i in p.indices if not 0 <= i < count]
        if bad:
            raise sb.PlanError(f"indices {bad} are not blocks of a model of {count} blocks (0..{count - 1})")
        kind: Kind = "noisy" if p.noise_std else "copy"
        out = []
        for i in range(count):
            out.append((i, "copy"))
            out.extend((i, kind) for _ in range(p.indices.count(i)))
        return out

    def _zeroed(self, rest: str) -> bool:
        """Whether a block tensor (``rest``: its name after ``prefix.N.``) belongs to a module zeroed in llama_pro copies."""
        module = "." + rest.rsplit(".", 1)[0] + "."
        return any(f".{name}." in module for name in self.params.zero)

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        stack = find_stack(metas, self.params.prefix)
        layout = self.layout(stack.count)
        if self.params.method == "llama_pro":
            self._check_zero(stack)
        #: source block -> the new positions holding it, with their kind
        positions: dict[int, list[tuple[int, Kind]]] = {}
        for new, (old, kind) in enumerate(layout):
            positions.setdefault(old, []).append((new, kind))
        groups: list[sb.Group] = []
        for old in range(stack.count):
            places = positions.get(old, [])
            for key, rest in stack.keys[old]:
                meta = metas[key]
                if not places:
                    groups.append(sb.Group(inputs=(key,), outputs={}, compute=lambda t: {},
                                           ops=(f"grow_depth(drop block {old})",)))
                    continue
                zeroed = [new for new, kind in places if kind == "zeroed" and self._zeroed(rest)]
                # a zeroed copy's other tensors (attention inputs, norms, ...) are copies of the block's bytes
                carried = [(new, "copy" if kind == "zeroed" else kind) for new, kind in places if new not in zeroed]
                groups.extend(self._zero_group(stack.key(new, rest), meta, old) for new in zeroed)
                if carried:
                    groups.append(self._carry_group(stack, key, rest, meta, old, carried))
        return groups

    def _check_zero(self, stack: Stack) -> None:
        """Each name in ``zero`` must name a module of every block: a name that matches nothing would leave the copies live."""
        for name in self.params.zero:
            for block, keys in stack.keys.items():
                if not any(f".{name}." in "." + rest.rsplit(".", 1)[0] + "." for _, rest in keys):
                    example = ", ".join(rest for _, rest in keys[:4])
                    raise sb.PlanError(f"zero: {name!r} names no module of block {block} of {stack.prefix!r} "
                                       f"(it has e.g. {example}); name this architecture's output projections")

    def _zero_group(self, key: str, meta: sb.TensorMeta, old: int) -> sb.Group:
        # zero bytes, written without a tensor: a llama_pro run copies everything else raw and never imports torch
        return sb.Group.zeros(key, meta, f"grow_depth(llama_pro: zero, copy of block {old})")

    def _carry_group(self, stack: Stack, key: str, rest: str, meta: sb.TensorMeta, old: int,
                     places: list[tuple[int, Kind]]) -> sb.Group:
        if len(places) == 1 and places[0][1] == "copy":
            new = stack.key(places[0][0], rest)
            return sb.Group.rename(key, new, meta, op="grow_depth(renumber)" if new != key else "rename")
        outputs = {stack.key(new, rest): meta for new, _ in places}
        raw = {stack.key(new, rest): whole(key, meta) for new, kind in places if kind == "copy"}
        noisy = [stack.key(new, rest) for new, kind in places if kind == "noisy"]
        std, seed = self.params.noise_std, self.params.seed

        def compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {name: tensors[key] for name in raw}
            for name in noisy:
                out[name] = with_noise(tensors[key], std, seed, name)
            return out

        what = "copy" + (f" + noise(std={std:g}, seed={seed})" if noisy else "")
        return sb.Group(inputs=(key,), outputs=outputs, compute=compute, pieces=raw,
                        ops=(f"grow_depth({self.params.method}: {what} of block {old} to {sb_range([n for n, _ in places])})",))

    def config_edits(self, metas: Mapping[str, sb.TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """The block count and every per-layer list of ``config.json``, for the new stack."""
        stack = find_stack(metas, self.params.prefix)
        return per_layer_edits(config, stack.count, [old for old, _ in self.layout(stack.count)])


def with_noise(tensor: torch.Tensor, std: float, seed: int, name: str) -> torch.Tensor:
    """``tensor`` plus Gaussian noise of ``std``, drawn from a generator seeded by ``seed`` and the output's name.

    Seeding by name makes each copy's noise independent of the order groups run in (threads,
    torchrun ranks), so the output is byte-identical from run to run.  Integer tensors get none.
    """
    import torch

    if not tensor.dtype.is_floating_point:
        return tensor.clone()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
    return (tensor.to(torch.float32) + noise).to(tensor.dtype)
