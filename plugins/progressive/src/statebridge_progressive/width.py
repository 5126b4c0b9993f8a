"""The ``grow_width`` transform: a wider model that computes the same function, planned from headers.

Every width is a map from new units to old ones, and each tensor is gathered along its dims
by those maps; what makes the result the same function is where values are divided or zeroed:

- **Residual stream** (``hidden_size``), two ways.  ``clone`` (HyperCloning; an integer factor
  ``n``): new channel ``c`` repeats old channel ``c mod d``, so the hidden state is ``[h, h, …]``.
  Its RMS is that of ``h``, so norm weights are repeated; matrices reading the stream divide
  their input columns by ``n`` (``n`` equal copies sum back to one), matrices writing it
  repeat their rows.  ``zero`` (any larger size): new channels are zero and stay zero — the
  embedding's new columns and the writers' new rows are zero — and RMSNorm, which now averages
  over ``d'`` channels, gets its weights scaled by ``sqrt(d / d')`` and its epsilon by ``d / d'``
  (a config.json edit), so the original channels see exactly the same normalisation.  Tied
  embeddings need ``zero`` (cloned, the tied head would read ``n`` times the logits), and
  ``auto`` picks ``clone`` for an integer factor of an untied model, else ``zero``.
- **MLP** (``intermediate_size``), Net2Net: new neuron ``i`` repeats old neuron ``i mod I``
  (gate and up rows copied; a gated activation is per neuron, so the copies compute the same
  value) and ``down_proj`` divides each neuron's column by its number of copies.
- **Attention**: the head size stays; query and key/value heads are cloned so that every
  query head still attends with a copy of its own key/value head (GQA groups kept: new key/value
  head ``s`` copies old head ``s mod K``, and the query slots under the copies of old head
  ``k`` cycle through that group's query heads), and ``o_proj`` divides each head's columns by
  its number of copies.  Sizes whose groups cannot be kept are refused.

``noise_std`` breaks the symmetry between copies without changing the function: a split
column's copies get noise that sums to zero across the copies (their inputs are equal), and
columns that read the zero channels of a ``zero`` residual get free noise (they multiply
zeros).  A head-size change (``new_head_dim``) cannot keep the function (the attention
temperature and RoPE frequencies depend on it): it is refused unless ``function_preserving:
false``, which the plan's ops show; each head is then zero-padded in both RoPE halves.

Names are those of the Llama family (Llama, Mistral, Qwen2/2.5/3): ``embed_tokens``,
``q/k/v/o_proj``, ``gate/up/down_proj``, ``*norm``, ``lm_head``.  A tensor of another name that
has a dimension of the residual or MLP width is refused, naming it, rather than left narrow.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

import statebridge as sb

from .layers import find_stack
from .tprog import RecordsGrowth

if TYPE_CHECKING:
    import torch

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # read the residual stream (input columns)
WRITERS = ("o_proj", "down_proj")  # write the residual stream (output rows)
HEAD_NORMS = ("q_norm", "k_norm")  # per-head norms of the head size (Qwen3)


@dataclass(frozen=True)
class Axis:
    """How one dimension grows: new index -> old index (-1: a new, zero unit) and a scale per new index.

    ``noise`` says where symmetry-breaking noise keeps the function: ``split`` adds noise
    summing to zero over the new indices sharing an old one (their inputs are equal),
    ``free`` adds it on the new, zero-input indices (-1), None adds none.
    """

    src: tuple[int, ...]
    scale: tuple[float, ...] | None = None
    noise: Literal["split", "free"] | None = None

    @property
    def size(self) -> int:
        return len(self.src)

    def identity(self) -> bool:
        return self.src == tuple(range(len(self.src))) and self.scale is None


def cycle(old: int, new: int) -> list[int]:
    """New unit i copies old unit ``i mod old``."""
    return [i % old for i in range(new)]


def split(src: list[int], noise: bool) -> Axis:
    """The input axis of copies that must sum back to one: each divided by its number of copies."""
    counts: dict[int, int] = {}
    for s in src:
        counts[s] = counts.get(s, 0) + 1
    return Axis(tuple(src), tuple(1.0 / counts[s] for s in src), "split" if noise else None)


class GrowWidth(RecordsGrowth):
    """Widen the residual stream, the MLP and the attention heads, keeping the model's function."""

    name = "grow_width"

    class Params(sb.Params):
        head_dim: int  # the model's head size (config.json's head_dim, or hidden_size / num_attention_heads)
        factor: int | None = None  # every width times this (HyperCloning)
        hidden_size: int | None = None  # or explicit sizes, each at least the current one (unchanged when absent)
        intermediate_size: int | None = None
        num_attention_heads: int | None = None
        num_key_value_heads: int | None = None
        residual: Literal["auto", "clone", "zero"] = "auto"
        noise_std: float = 0.0  # symmetry-breaking noise that keeps the function (see the module's docstring)
        seed: int = 0
        new_head_dim: int | None = None  # a head-size change: needs function_preserving: false
        function_preserving: bool = True
        prefix: str | None = None

        @model_validator(mode="after")
        def _sizes(self) -> "GrowWidth.Params":
            explicit = [self.hidden_size, self.intermediate_size, self.num_attention_heads, self.num_key_value_heads]
            if self.factor is not None and any(v is not None for v in explicit):
                raise ValueError("give either 'factor' or explicit sizes, not both")
            if self.factor is not None and self.factor < 1:
                raise ValueError("factor must be at least 1")
            if self.noise_std < 0:
                raise ValueError("noise_std must not be negative")
            if self.new_head_dim is not None and self.new_head_dim != self.head_dim and self.function_preserving:
                raise ValueError(f"new_head_dim {self.new_head_dim} changes the head size {self.head_dim}, which cannot "
                                 "keep the function (attention temperature, RoPE frequencies); set "
                                 "function_preserving: false to do it anyway")
            return self

    # -- sizes -----------------------------------------------------------------------------
    def sizes(self, metas: Mapping[str, sb.TensorMeta]) -> tuple[dict[str, int], dict[str, int]]:
        """The current sizes (read from the headers) and the new ones."""
        p = self.params
        stack = find_stack(metas, p.prefix)
        first = {rest: key for key, rest in stack.keys[0]}
        need = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight"]
        missing = [n for n in need if n not in first]
        if missing:
            raise sb.PlanError(f"block 0 of {stack.prefix!r} has no {', '.join(missing)}: grow_width knows the Llama "
                               f"family's names (q/k/v/o_proj, gate/up/down_proj)")
        q, k, gate = (metas[first[n]].shape for n in need)
        hd = p.head_dim
        if q[0] % hd or k[0] % hd:
            raise sb.PlanError(f"head_dim {hd} does not divide q_proj's {q[0]} or k_proj's {k[0]} rows")
        old = {"hidden_size": q[1], "intermediate_size": gate[0], "num_attention_heads": q[0] // hd,
               "num_key_value_heads": k[0] // hd}
        if p.factor is not None:
            new = {name: value * p.factor for name, value in old.items()}
        else:
            new = {name: getattr(p, name) or value for name, value in old.items()}
        for name, value in new.items():
            if value < old[name]:
                raise sb.PlanError(f"{name} {value} is smaller than the current {old[name]}: grow_width only grows")
        if new["num_attention_heads"] % new["num_key_value_heads"]:
            raise sb.PlanError(f"num_attention_heads {new['num_attention_heads']} is not a multiple of "
                               f"num_key_value_heads {new['num_key_value_heads']}")
        return old, new

    def residual(self, metas: Mapping[str, sb.TensorMeta], old: int, new: int) -> Literal["clone", "zero"]:
        tied = not any(k.endswith("lm_head.weight") for k in metas)
        mode = self.params.residual
        if mode == "auto":
            return "clone" if new % old == 0 and not tied else "zero"
        if mode == "clone" and new % old:
            raise sb.PlanError(f"residual: clone needs hidden_size {new} to be a multiple of {old}; use residual: zero")
        if mode == "clone" and tied:
            raise sb.PlanError("residual: clone with tied embeddings would multiply the logits; use residual: zero")
        return mode

    def heads(self, old: dict[str, int], new: dict[str, int]) -> tuple[list[int], list[int]]:
        """New query head -> old query head, new key/value head -> old key/value head, GQA groups kept."""
        H, K, H2, K2 = old["num_attention_heads"], old["num_key_value_heads"], new["num_attention_heads"], new["num_key_value_heads"]
        G, G2 = H // K, H2 // K2
        kv = cycle(K, K2)
        slots: dict[int, list[int]] = {}
        for p in range(H2):
            slots.setdefault(kv[p // G2], []).append(p)
        q = [0] * H2
        for k in range(K):
            if len(slots[k]) < G:
                raise sb.PlanError(f"{H2} query heads over {K2} key/value heads leave old key/value head {k} "
                                   f"{len(slots[k])} query slots for its {G} query heads: GQA groups cannot be kept")
            for j, p in enumerate(slots[k]):
                q[p] = k * G + j % G
        return q, kv

    # -- plan ------------------------------------------------------------------------------
    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        axes = self._axes(metas)
        groups = []
        for key, meta in metas.items():
            dims = self._role(key, meta, axes)
            if dims is None:
                continue
            if all(a.identity() for a in dims):
                continue
            groups.append(self._group(key, meta, dims))
        return groups

    def _axes(self, metas: Mapping[str, sb.TensorMeta]) -> dict[str, Any]:
        p = self.params
        old, new = self.sizes(metas)
        d, d2, n_i, n_i2 = old["hidden_size"], new["hidden_size"], old["intermediate_size"], new["intermediate_size"]
        mode = self.residual(metas, d, d2)
        noise = p.noise_std > 0
        if mode == "clone":
            stream = Axis(tuple(cycle(d, d2)))
            reads = split(cycle(d, d2), noise)
            norm = stream
        else:
            zero = tuple(list(range(d)) + [-1] * (d2 - d))
            c = math.sqrt(d / d2)
            stream = Axis(zero)
            reads = Axis(zero, None, "free" if noise and d2 > d else None)
            norm = Axis(tuple(list(range(d)) + [0] * (d2 - d)), (c,) * d2)  # new channels: any weight (they read zeros)
        hd, hd2 = p.head_dim, p.new_head_dim or p.head_dim
        within = self._within_head(hd, hd2)
        q_heads, kv_heads = self.heads(old, new)

        def per_head(heads: list[int]) -> tuple[int, ...]:
            return tuple(-1 if w < 0 else h * hd + w for h in heads for w in within)

        q_counts = {h: q_heads.count(h) for h in set(q_heads)}
        o_cols = Axis(per_head(q_heads), tuple(1.0 / q_counts[h] for h in q_heads for _ in within), "split" if noise else None)
        neurons = cycle(n_i, n_i2)
        return {
            "old": old, "new": new, "mode": mode, "stream": stream, "reads": reads, "norm": norm,
            "q_rows": Axis(per_head(q_heads)), "kv_rows": Axis(per_head(kv_heads)), "o_cols": o_cols,
            "neurons": Axis(tuple(neurons)), "down_cols": split(neurons, noise), "head_norm": Axis(tuple(max(w, 0) for w in within)),
            "hd": hd,
        }

    @staticmethod
    def _within_head(hd: int, hd2: int) -> list[int]:
        """New position within a head -> old one (-1: zero padding), padding each RoPE half at its end."""
        if hd2 == hd:
            return list(range(hd))
        if hd % 2 or hd2 % 2:
            raise sb.PlanError(f"head sizes {hd} -> {hd2}: both must be even (RoPE rotates two halves)")
        half, half2 = hd // 2, hd2 // 2
        return [j if j < half else -1 for j in range(half2)] + [half + j if j < half else -1 for j in range(half2)]

    def _role(self, key: str, meta: sb.TensorMeta, axes: dict[str, Any]) -> list[Axis] | None:
        """The axes of ``key``'s dims, or None for a tensor grow_width leaves as it is."""
        parts = key.split(".")
        module, kind = (parts[-2] if len(parts) > 1 else ""), parts[-1]
        shape = meta.shape
        d, n_i = axes["old"]["hidden_size"], axes["old"]["intermediate_size"]
        if module == "embed_tokens" and kind == "weight":
            return [Axis(tuple(range(shape[0]))), axes["stream"]]
        if module == "lm_head" and kind == "weight":
            return [Axis(tuple(range(shape[0]))), axes["reads"]]
        rows = {"q_proj": "q_rows", "k_proj": "kv_rows", "v_proj": "kv_rows", "gate_proj": "neurons", "up_proj": "neurons",
                "o_proj": "stream", "down_proj": "stream"}
        cols = {"q_proj": "reads", "k_proj": "reads", "v_proj": "reads", "gate_proj": "reads", "up_proj": "reads",
                "o_proj": "o_cols", "down_proj": "down_cols"}
        if module in rows and kind == "weight":
            return [axes[rows[module]], axes[cols[module]]]
        if module in rows and kind == "bias":
            return [axes[rows[module]]]
        if module in HEAD_NORMS and shape == (axes["hd"],):
            return [axes["head_norm"]]
        if module.endswith("norm") and shape == (d,):
            if kind == "bias" and axes["mode"] == "zero":
                raise sb.PlanError(f"{key!r}: a LayerNorm bias cannot keep the function when the residual stream is "
                                   "zero-extended (the mean would change); use an integer factor (residual: clone)")
            return [axes["norm"] if kind == "weight" else axes["stream"]]
        if (d in shape or n_i in shape) and meta.dtype.is_floating_point and len(shape) > 0:
            raise sb.PlanError(f"{key!r} {list(shape)} has a dimension of the width being grown, but grow_width does "
                               "not know what it is (it knows the Llama family's names)")
        return None

    def _group(self, key: str, meta: sb.TensorMeta, dims: list[Axis]) -> sb.Group:
        out = sb.TensorMeta(tuple(a.size for a in dims), meta.dtype)
        p = self.params
        std, seed = p.noise_std, p.seed
        note = "" if p.function_preserving else ", function_preserving: false"
        op = f"grow_width({list(meta.shape)} -> {list(out.shape)}{note})"
        return sb.Group.map_one(key, key, out, lambda t: widen(t, dims, std, seed, key), op, effort=2)

    def config_edits(self, metas: Mapping[str, sb.TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """The new sizes; ``head_dim`` where it no longer follows from them; RMSNorm's epsilon for a zero-extended stream."""
        model_type = str(config.get("model_type", ""))
        if model_type.startswith("gemma"):
            raise sb.PlanError(f"grow_width cannot keep a {model_type} model's function: it scales its embeddings by "
                               "sqrt(hidden_size), which changes with the width")
        heads, size = config.get("num_attention_heads"), config.get("hidden_size")
        current = config.get("head_dim") or (size // heads if isinstance(size, int) and isinstance(heads, int) and heads else None)
        if current is not None and current != self.params.head_dim:
            raise sb.PlanError(f"head_dim {self.params.head_dim} is not config.json's head size {current}")
        old, new = self.sizes(metas)
        edits: dict[str, Any] = {k: v for k, v in new.items() if k in config}
        hd2 = self.params.new_head_dim or self.params.head_dim
        if "head_dim" in config or new["hidden_size"] != new["num_attention_heads"] * hd2:
            edits["head_dim"] = hd2
        if self.residual(metas, old["hidden_size"], new["hidden_size"]) == "zero":
            for name in ("rms_norm_eps", "layer_norm_eps", "norm_eps"):
                if isinstance(config.get(name), (int, float)):
                    edits[name] = config[name] * old["hidden_size"] / new["hidden_size"]
        return edits


def widen(tensor: torch.Tensor, dims: list[Axis], std: float, seed: int, name: str) -> torch.Tensor:
    """Gather ``tensor`` along each dim by its axis (zeros at -1), scale, add the noise the axes allow; float32 inside."""
    import torch

    out = tensor.to(torch.float32)
    for dim, axis in enumerate(dims):
        if axis.identity():
            continue
        src = torch.tensor(axis.src, dtype=torch.long)
        out = out.index_select(dim, src.clamp(min=0))
        shape = [1] * out.dim()
        shape[dim] = axis.size
        if (src < 0).any():
            out = out * (src >= 0).to(torch.float32).view(shape)
        if axis.scale is not None:
            out = out * torch.tensor(axis.scale, dtype=torch.float32).view(shape)
        if axis.noise and std > 0:
            out = out + _noise(out.shape, dim, axis, std, seed, name)
    return out.to(tensor.dtype)


def _noise(shape: torch.Size, dim: int, axis: Axis, std: float, seed: int, name: str) -> torch.Tensor:
    """Noise that does not change the function: zero-sum over copies (``split``) or only on new units (``free``)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    src = torch.tensor(axis.src, dtype=torch.long)
    view = [1] * len(shape)
    view[dim] = axis.size
    if axis.noise == "free":
        return noise * (src < 0).to(torch.float32).view(view)
    groups = int(src.max()) + 1
    sums_shape = list(shape)
    sums_shape[dim] = groups
    sums = torch.zeros(sums_shape, dtype=torch.float32).index_add_(dim, src, noise)
    counts = torch.zeros(groups, dtype=torch.float32).index_add_(0, src, torch.ones(axis.size))
    return noise - (sums / counts.view([groups if i == dim else 1 for i in range(len(shape))])).index_select(dim, src)
