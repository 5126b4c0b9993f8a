"""Where a weight's inputs come from: captured activations, or an llama.cpp imatrix.

- ``--activations`` / ``--eval-x``: safetensors, one ``[n, in]`` matrix per weight name
  (GGUF or Hugging Face name; :func:`.names.aliases`), as ``seeddelta capture`` writes.
  Importance is ``d_j = mean(x_j²)``.
- ``--imatrix``: llama.cpp's importance matrix, either the GGUF one (tensors
  ``<weight>.in_sum2`` and ``<weight>.counts``: ``d = in_sum2 / counts``) or the legacy
  ``.dat`` (``int32 n``; per entry ``int32 len, name, int32 ncall, int32 nval,
  float32[nval]`` sums of squares: ``d = values / ncall``).

A weight with neither is fitted with the activations of a weight with the same input when
there is one (``ffn_up`` and ``ffn_gate`` read the same vector), else reported as having
none (it is skipped, and the report says why).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

from statebridge import SourceError

from . import names

if TYPE_CHECKING:
    import torch


class Activations:
    """The matrices of one safetensors file, looked up by any alias of a weight's name."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own errors for a missing or malformed file
            raise SourceError(path, f"cannot read activations: {e}") from None
        self.keys = set(self._file.keys())

    def get(self, weight: str, inp: int) -> torch.Tensor | None:
        for alias in _candidates(weight):
            if alias in self.keys:
                x = self._file.get_tensor(alias)
                if x.ndim != 2 or x.shape[1] != inp:
                    raise SourceError(self.path, f"{alias} is {list(x.shape)}, expected [n, {inp}]")
                return x.float()
        return None


def _candidates(weight: str) -> list[str]:
    """The weight's aliases, then those of the weight sharing its input (gate <-> up)."""
    found = names.aliases(weight)
    where = names.classify(weight)
    if where is not None and where[1] in ("ffn_gate", "ffn_up"):
        twin = "ffn_up" if where[1] == "ffn_gate" else "ffn_gate"
        found += names.aliases(names.gguf_name(where[0], twin))
    return found


def read_imatrix(path: str) -> dict[str, torch.Tensor]:
    """``{weight name: d}`` from a GGUF or legacy ``.dat`` imatrix."""
    import torch

    p = Path(path)
    try:
        head = p.read_bytes()[:4]
    except OSError as e:
        raise SourceError(path, f"cannot read the imatrix: {e.strerror or e}") from None
    if head == b"GGUF":
        from statebridge.readers.gguf import GGUFSource

        src = GGUFSource(p)
        try:
            found = {}
            for key in src.metas():
                if key.endswith(".in_sum2"):
                    weight = key.removesuffix(".in_sum2")
                    counts = f"{weight}.counts"
                    if counts not in src.metas():
                        raise SourceError(path, f"{key} has no {counts}")
                    s, c = src.load(key).float().reshape(-1, src.metas()[key].shape[-1]), src.load(counts).float().reshape(-1)
                    found[weight] = (s.sum(0) / c.sum().clamp_min(1)).clone()
            return found
        finally:
            src.close()
    data = p.read_bytes()
    found, pos = {}, 0

    def take(fmt: str, what: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise SourceError(path, f"legacy imatrix cut short reading {what} at byte {pos}")
        value = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    (count,) = take("<i", "the entry count")
    for i in range(count):
        (length,) = take("<i", f"entry {i}'s name length")
        if length < 0 or length > 4096:
            raise SourceError(path, f"entry {i} has a name length of {length}")
        name = data[pos : pos + length].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii", f"{name}'s counts")
        values = take(f"<{nval}f", f"{name}'s {nval} values")
        found[name] = torch.tensor(values, dtype=torch.float32) / max(ncall, 1)
    return found
