"""How a fit is stored: its tensors (next to the weight, named ``<stem>.sd_*``) and the ``seeddelta.*`` key-values.

Tensors of a weight ``blk.3.ffn_up.weight`` (``out × in``):

======================  =========  =============================  ==========================
name                    type       shape (torch order)            when
======================  =========  =============================  ==========================
``blk.3.ffn_up.sd_idx`` I16 / I32  ``(out, K)``; block: (⌈out/b⌉, K)  always (I32 when in > 32768)
``blk.3.ffn_up.sd_val`` F16        ``(out, K)``                   always
``blk.3.ffn_up.sd_rs``  F16        ``(out,)``                     ``row_scale``
``blk.3.ffn_up.sd_xc``  F16        ``(depth, Ta, Tb, n)``         base ``xor_circulant``
``blk.3.ffn_up.sd_xr``  F16        ``(depth, out)``               base ``xor_circulant``
``blk.3.ffn_up.sd_xs``  I32        ``(depth,)``                   base ``xor_circulant``
``blk.3.ffn_up.sd_lu``  F16        ``(out, r)``                   base ``lowrank``
``blk.3.ffn_up.sd_lv``  F16        ``(r, in)``                    base ``lowrank``
======================  =========  =============================  ==========================

Key-values (arrays are parallel, one entry per weight with SeedΔ tensors, in file order):
``seeddelta.format_version`` (1), ``seeddelta.policy_hash``, ``seeddelta.strip_dense`` (any
dense weight stripped), ``seeddelta.weights``, ``seeddelta.base``, ``seeddelta.scheme``,
``seeddelta.K``, ``seeddelta.block`` (0 for coo), ``seeddelta.rank``, ``seeddelta.seed``,
``seeddelta.in_features``, ``seeddelta.out_features``, ``seeddelta.stripped`` (0/1) and
``seeddelta.unsafe``: the weights that were fitted but failed gating (they stay dense,
with no SeedΔ tensors), so an audit needs no report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statebridge import PlanError

from . import names, residual, xorc

if TYPE_CHECKING:
    import torch

    from .fit import Fit

FORMAT_VERSION = 1
PREFIX = "seeddelta."


def fit_tensors(weight: str, fit: Fit) -> dict[str, torch.Tensor]:
    """The tensors that store ``fit`` for ``weight``, in their stored dtypes."""
    import torch

    _, inp = fit.shape
    idx_dtype = torch.int16 if residual.index_bytes(inp) == 2 else torch.int32
    found = {
        names.sd_name(weight, "idx"): fit.residual.idx.to(idx_dtype).contiguous(),
        names.sd_name(weight, "val"): fit.residual.val.half().contiguous(),
    }
    if fit.row_scale is not None:
        found[names.sd_name(weight, "rs")] = fit.row_scale.half()
    if fit.base == "xor_circulant":
        found[names.sd_name(weight, "xc")] = torch.stack([t.c for t in fit.terms]).half()
        found[names.sd_name(weight, "xr")] = torch.stack([t.r for t in fit.terms]).half()
        found[names.sd_name(weight, "xs")] = torch.tensor([t.seed for t in fit.terms], dtype=torch.int32)
    if fit.base == "lowrank":
        assert fit.u is not None and fit.v is not None
        found[names.sd_name(weight, "lu")] = fit.u.half().contiguous()
        found[names.sd_name(weight, "lv")] = fit.v.half().contiguous()
    for name in found:
        if len(name.encode()) > names.MAX_NAME_BYTES:
            raise PlanError(f"SeedΔ tensor name {name!r} is {len(name.encode())} bytes; GGUF (llama.cpp) allows "
                            f"{names.MAX_NAME_BYTES}")
    return found


@dataclass
class Entry:
    """One weight's SeedΔ description, as the key-values give it."""

    weight: str
    base: str
    scheme: str
    K: int
    block: int
    rank: int
    seed: int
    in_features: int
    out_features: int
    stripped: bool

    @classmethod
    def of(cls, weight: str, fit: Fit, stripped: bool) -> Entry:
        out, inp = fit.shape
        return cls(weight, fit.base, fit.residual.scheme, fit.K,
                   fit.residual.block if fit.residual.scheme == "block" else 0, fit.rank,
                   fit.spec.seed, inp, out, stripped)


_ARRAYS = ("base", "scheme", "K", "block", "rank", "seed", "in_features", "out_features")


def key_values(entries: list[Entry], *, policy_hash: str, unsafe: list[str]) -> dict[str, Any]:
    """The ``seeddelta.*`` fields (plain Python values: the GGUF writer types them)."""
    kv: dict[str, Any] = {
        f"{PREFIX}format_version": FORMAT_VERSION,
        f"{PREFIX}policy_hash": policy_hash,
        f"{PREFIX}strip_dense": any(e.stripped for e in entries),
        f"{PREFIX}weights": [e.weight for e in entries],
        f"{PREFIX}stripped": [int(e.stripped) for e in entries],
        f"{PREFIX}unsafe": list(unsafe),
    }
    for field in _ARRAYS:
        kv[f"{PREFIX}{field}"] = [getattr(e, field) for e in entries]
    return {k: v for k, v in kv.items() if not (isinstance(v, list) and not v)}  # GGUF arrays need a type: none empty


def read_entries(fields: Mapping[str, Any], path: str) -> list[Entry]:
    """The entries of a file's key-values (``fields``: name -> value); one line naming the field if they do not agree."""
    from statebridge import SourceError

    version = fields.get(f"{PREFIX}format_version")
    if version is None:
        raise SourceError(path, f"no seeddelta.format_version: not a SeedΔ file")
    if int(version) != FORMAT_VERSION:
        raise SourceError(path, f"seeddelta.format_version {version} (this plugin reads {FORMAT_VERSION})")
    weights = list(fields.get(f"{PREFIX}weights", []))
    columns = {f: list(fields.get(f"{PREFIX}{f}", [])) for f in (*_ARRAYS, "stripped")}
    for f, values in columns.items():
        if len(values) != len(weights):
            raise SourceError(path, f"seeddelta.{f} has {len(values)} entries for {len(weights)} seeddelta.weights")
    return [Entry(w, *(columns[f][i] for f in _ARRAYS), bool(columns["stripped"][i])) for i, w in enumerate(weights)]


def xor_terms(xc: torch.Tensor, xr: torch.Tensor, xs: torch.Tensor) -> list[xorc.XorTerm]:
    return [xorc.XorTerm(int(xs[t]), xc[t].float(), xr[t].float()) for t in range(xs.numel())]
