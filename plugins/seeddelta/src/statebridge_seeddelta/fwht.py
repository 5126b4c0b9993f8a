"""The fast Walsh–Hadamard transform, and the seeded permutations and signs of the xor-circulant base.

``fwht(x)`` multiplies the last dimension of ``x`` (a power of two, ``n``) by the Sylvester
Hadamard matrix ``H[u, k] = (-1)^popcount(u & k)`` in ``n log2 n`` additions, unnormalised
(``H @ H = n·I``). It is what makes an xor-circulant matrix cheap: ``C[u, v] = c[u ^ v]``
is diagonalised by ``H``, ``C x = H((H c) ⊙ (H x)) / n``.

The permutations and signs are defined here, not by torch's generator, so that another
runtime (llama.cpp's C++) can regenerate them from the stored seed: the key of index ``i``
in stream ``s`` is ``splitmix64(seed·φ + s·γ + i)`` (64-bit wrap-around), a permutation is
the stable argsort of the keys, and a sign is ``-1`` where the key's top bit is set.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_PHI = np.uint64(0x9E3779B97F4A7C15)
_GAMMA = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

#: the streams of one seed: which rows go where, which columns go where, the columns' signs
ROWS, COLS, SIGNS = 0, 1, 2


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last dimension (``H`` symmetric), unnormalised; a new tensor, ``x`` untouched.

    ``H`` of size ``n = 2^(h+l)`` is the Kronecker product ``H_{2^h} ⊗ H_{2^l}``, so with the
    last dimension viewed as ``(2^h, 2^l)`` the transform is ``H_{2^h} · X · H_{2^l}``: two small
    matrix products (about ``2·√n`` multiply-adds per element, done by BLAS in two passes over
    the data) instead of ``log2 n`` butterfly passes, which is several times faster for the
    sizes a base uses. The products are exact sums of ±x, deterministic for any thread count.
    """
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two length, not {n}")
    bits = n.bit_length() - 1
    low = bits // 2
    y = x.reshape(-1, n >> low, 1 << low) @ _hadamard(low, x.dtype)
    return (_hadamard(bits - low, x.dtype) @ y).reshape(x.shape)


@functools.lru_cache(maxsize=16)
def _hadamard(bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The Sylvester Hadamard matrix of size ``2^bits``."""
    import torch

    h = torch.ones(1, 1, dtype=dtype)
    for _ in range(bits):
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    return h


def keys(seed: int, stream: int, n: int) -> np.ndarray:
    """splitmix64 of ``seed·φ + stream·γ + i`` for ``i < n`` (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) * _PHI + np.uint64(stream) * _GAMMA + np.arange(n, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * _GAMMA
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def permutation(seed: int, stream: int, n: int) -> np.ndarray:
    """``order``: position ``q`` of the permuted vector holds element ``order[q]`` (int64)."""
    return np.argsort(keys(seed, stream, n), kind="stable").astype(np.int64)


def signs(seed: int, n: int) -> np.ndarray:
    """±1 (float32) per column: -1 where the key's top bit is set."""
    return np.where(keys(seed, SIGNS, n) >> np.uint64(63), -1.0, 1.0).astype(np.float32)
