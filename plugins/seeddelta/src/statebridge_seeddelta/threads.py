"""One torch intra-op thread for a block of work, the caller's setting restored after.

The fits run on one thread for two reasons, both about MKL under torch's threads: BLAS splits
some products (thin matrix products, QR, SVD) differently at other thread counts, so a
last-bit difference would change a build's bytes with the machine's size; and torch's batched
LU on CPU with two or more threads gives wrong pivots for systems of 150 or more unknowns
(:func:`.residual.refit`). Tensors, not threads, are the unit of parallel work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def one() -> Iterator[None]:
    """Run the block on one torch intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
