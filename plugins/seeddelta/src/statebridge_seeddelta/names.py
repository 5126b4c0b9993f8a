"""The FFN weights SeedΔ works on, under GGUF names and Hugging Face names, and the names of its own tensors."""

from __future__ import annotations

import re

#: the tensor types of policy v1
TENSOR_TYPES = ("ffn_gate", "ffn_up", "ffn_down")

_GGUF = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.weight$")
_HF = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_HF_TYPE = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}

#: the suffixes of a weight's SeedΔ tensors (``blk.3.ffn_up.weight`` -> ``blk.3.ffn_up.sd_idx``)
SUFFIXES = {
    "idx": "sd_idx",   # residual column indices, int16/int32: (out, K) coo, (ceil(out/block), K) block
    "val": "sd_val",   # residual values, float16 (out, K)
    "rs": "sd_rs",     # output row scale, float16 (out,)
    "xc": "sd_xc",     # xor-circulant coefficients, float16 (depth, Ta, Tb, n)
    "xr": "sd_xr",     # xor-circulant row scales, float16 (depth, out)
    "xs": "sd_xs",     # xor-circulant seeds, int32 (depth,)
    "lu": "sd_lu",     # low-rank U, float16 (out, r)
    "lv": "sd_lv",     # low-rank V, float16 (r, in)
}
MAX_NAME_BYTES = 63  # llama.cpp's GGML_MAX_NAME is 64 with the terminating zero


def classify(name: str) -> tuple[int, str] | None:
    """``(layer, tensor type)`` of an FFN weight name in either convention, else None."""
    m = _GGUF.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    m = _HF.match(name)
    if m:
        return int(m.group(1)), _HF_TYPE[m.group(2)]
    return None


def gguf_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.{kind}.weight"


def hf_name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.mlp.{kind.removeprefix('ffn_')}_proj.weight"


def aliases(name: str) -> list[str]:
    """``name`` and its name in the other convention (for finding its activations)."""
    found = classify(name)
    if found is None:
        return [name]
    return list(dict.fromkeys([name, gguf_name(*found), hf_name(*found)]))


def sd_name(weight: str, part: str) -> str:
    """The name of ``part`` (a key of :data:`SUFFIXES`) of ``weight``'s SeedΔ tensors."""
    stem = weight.removesuffix(".weight")
    return f"{stem}.{SUFFIXES[part]}"
