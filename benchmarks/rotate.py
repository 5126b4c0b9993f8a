"""A compute-heavy transform for the distributed benchmark, and the statebridge CLI with it registered.

``rotate`` turns the residual stream of a llama-style model by a seeded random
orthogonal matrix Q, as QuaRot and SpinQuant do before quantising: weights that
read the stream (embeddings, q/k/v, gate/up, lm_head) become ``W @ Q``, weights
that write it (o_proj, down_proj) become ``Q.T @ W``.  With RMSNorm weights of
one (as :mod:`statebridge.testing` writes them) the model computes the same
function.  Every 2-D weight costs a float32 matmul with the hidden size as inner
dimension, so the run is bound by compute, not I/O.

    torchrun --nproc-per-node 2 benchmarks/rotate.py run CONFIG   # the CLI, with ``rotate`` available

Rank 0 (or the only process) ends by printing how long the command took after
the imports, as an ``@@{"work": seconds}`` line for benchmarks/common.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from functools import cache

import torch

import statebridge as sb
from statebridge.cli import main

WRITES_STREAM = ("o_proj.weight", "down_proj.weight")


class Rotate(sb.Transform):
    """Rotate the residual stream by a seeded random orthogonal matrix."""

    name = "rotate"

    class Params(sb.Params):
        seed: int = 0

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        hidden = metas["model.embed_tokens.weight"].shape[1]
        seed = self.params.seed
        groups = []
        for key, meta in metas.items():
            if len(meta.shape) != 2:
                continue
            writes = key.endswith(WRITES_STREAM)

            def fn(w: torch.Tensor, writes: bool = writes) -> torch.Tensor:
                q = _orthogonal(hidden, seed)
                return (q.T @ w.float() if writes else w.float() @ q).to(w.dtype)

            # a (rows x hidden) @ (hidden x hidden) matmul: about `hidden` multiply-adds per element
            groups.append(sb.Group.map_one(key, key, meta, fn, "rotate", effort=hidden / 64))
        return groups


@cache
def _orthogonal(size: int, seed: int) -> torch.Tensor:
    """The same Q in every process: QR of a seeded Gaussian matrix, in float64, signs fixed."""
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()


@sb.hookimpl
def register_transforms(register):
    register(Rotate)


if __name__ == "__main__":
    from statebridge.plugins import installed

    installed().add(sys.modules[__name__], "rotate")  # a transform defined in a script, registered in-process
    started = time.perf_counter()
    status = main()
    if os.environ.get("RANK", "0") == "0":
        print("@@" + json.dumps({"work": time.perf_counter() - started, "rise": None}), flush=True)
    sys.exit(status)
