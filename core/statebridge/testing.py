"""Helpers for testing statebridge and its plugins: deterministic checkpoints, plugin and CLI checks.

:class:`GeneratedLlama` / :func:`write_llama` make llama-style checkpoints whose
names and shapes follow Hugging Face Llama (``model.layers.N.self_attn.q_proj.weight``,
...), with grouped-query attention so q, k and v differ in size; values come
from a seeded generator, so every build is bit-identical.
:func:`assert_plugin_loads` checks an installed plugin the way statebridge loads
it; :func:`run_cli` runs the real command line in a fresh process.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .readers.base import Source
from .tensors.meta import TensorMeta

if TYPE_CHECKING:
    from .plugins import PluginInfo


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a llama-style model."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes in Hugging Face order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (self.intermediate, h)
            yield p + "mlp.up_proj.weight", (self.intermediate, h)
            yield p + "mlp.down_proj.weight", (h, self.intermediate)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def nbytes_fp16(self) -> int:
        return sum(2 * torch.Size(s).numel() for _, s in self.tensors())


class GeneratedLlama(Source):
    """A llama-style checkpoint whose tensors are generated on demand (seeded per tensor).

    Reading it needs no file and no memory beyond one tensor, so it can feed a
    multi-GB benchmark checkpoint through the streaming writer.
    """

    def __init__(self, shape: LlamaShape = LlamaShape(), dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
        self.name = f"<generated llama, {shape.layers} layers>"
        self.shape, self.dtype, self.seed = shape, dtype, seed
        self._metas = {n: TensorMeta(s, dtype) for n, s in shape.tensors()}
        self._index = {n: i for i, n in enumerate(self._metas)}

    def metas(self) -> Mapping[str, TensorMeta]:
        return self._metas

    def load(self, key: str) -> torch.Tensor:
        dims = self._metas[key].shape
        if len(dims) == 1:
            return torch.ones(dims, dtype=self.dtype)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self._index[key])
        return (torch.randn(dims, generator=generator) * 0.02).to(self.dtype)


def llama_state_dict(shape: LlamaShape = LlamaShape(), dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete llama-style state dict in memory."""
    source = GeneratedLlama(shape, dtype, seed)
    return {key: source.load(key) for key in source.metas()}


def write_llama(
    path: str | os.PathLike[str],
    shape: LlamaShape = LlamaShape(),
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    shard_size: int | None = None,
) -> Path:
    """Write a llama-style checkpoint with the streaming writer (one tensor in memory at a time).

    ``path`` ending in ``.safetensors`` gives one file; otherwise a folder, sharded by ``shard_size``.
    """
    from .api import run

    run(GeneratedLlama(shape, dtype, seed), None, path, shard_size=shard_size, progress=False)
    return Path(path)


def write_many_tensors(path: str | os.PathLike[str], tensors: int = 200_000, layers: int = 64) -> int:
    """Write a header-heavy safetensors file of about ``tensors`` tiny float16 tensors; return how many.

    Laid out like a mixture-of-experts checkpoint (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``,
    attention, norms, embeddings), each tensor a few bytes of zeros: the cost of planning it is
    the cost of its header, which is what large-plan tests and benchmarks measure.
    """
    import json
    import struct

    experts = max(1, -(-(tensors - 2 - 6 * layers) // (3 * layers)))  # rounded up: at least ``tensors``
    header: dict[str, dict[str, object]] = {}
    offset = 0

    def add(key: str, shape: list[int]) -> None:
        nonlocal offset
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes

    add("model.embed_tokens.weight", [8, 4])
    for layer in range(layers):
        for expert in range(experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                add(f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", [2, 4])
        for proj in "qkvo":
            add(f"model.layers.{layer}.self_attn.{proj}_proj.weight", [4, 4])
        add(f"model.layers.{layer}.input_layernorm.weight", [4])
        add(f"model.layers.{layer}.mlp.gate.weight", [8, 4])
    add("lm_head.weight", [8, 4])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return len(header)


def assert_plugin_loads(entry_point: str, distribution: str) -> PluginInfo:
    """Check that the installed plugin ``entry_point`` (from ``distribution``) loads as statebridge loads it.

    It must be found through the ``statebridge`` entry-point group, import and
    register everything without error, and be at the core's version (first-party
    plugins are released together with the core).  Returns what it provides.
    """
    from ._version import __version__
    from .plugins import load_plugins

    plugins = load_plugins()
    plugins.collect_all()
    found = {p.name: p for p in plugins.info}
    assert entry_point in found, f"no statebridge entry point named {entry_point!r}; found {sorted(found)}"
    plugin = found[entry_point]
    assert plugin.error is None, f"{entry_point} failed to load: {plugin.error}"
    assert re.sub(r"[-_.]+", "-", plugin.distribution).lower() == distribution, plugin.distribution
    assert plugin.version == __version__, f"{distribution} {plugin.version} beside statebridge {__version__}"
    return plugin


def mapped_file(address: int) -> str | None:
    """The file mapped at memory ``address`` in this process (from /proc/self/maps), or None: a test's way to
    tell a tensor that is a view of a memory-mapped file from one read into memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


def run_cli(args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``statebridge ARGS`` in a fresh Python process (plugins load as for a user); never raises on exit status."""
    return subprocess.run(
        [sys.executable, "-m", "statebridge", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


#: the command line, then the process's own high-water mark of resident memory on stderr (VmHWM belongs
#: to the new program image; rusage would also count the pages of the parent it was forked from)
_PEAK = """
import atexit, sys
def _peak():
    with open("/proc/self/status") as f:
        sys.stderr.write(next(line for line in f if line.startswith("VmHWM:")))
atexit.register(_peak)
from statebridge.cli import main
sys.exit(main())
"""


def run_cli_peak(args: Sequence[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``statebridge ARGS`` in a fresh process as :func:`run_cli` does; also return its peak RSS in bytes (Linux)."""
    done = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = done.stderr.splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))
    done.stderr = "".join(line + "\n" for line in lines if not line.startswith("VmHWM:"))
    return done, peak
