"""What the analysis tests share: a tiny random Llama saved by transformers itself (config.json and model.safetensors),
and what llama.cpp's convert_hf_to_gguf.py does to one (its names, its rotary interleave of q and k)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def save_tiny_llama(
    folder: Path, *, layers: int, vocab: int = 96, hidden: int = 32, intermediate: int = 48,
    heads: int = 4, kv_heads: int = 2, tie: bool = False, seed: int = 0,
) -> LlamaForCausalLM:
    """Build the model with seeded random weights, save it to ``folder`` and return it."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    """:func:`save_tiny_llama`, for the tests' own fixtures (a conftest module is not imported by name)."""
    return save_tiny_llama


#: Hugging Face Llama names -> llama.cpp's GGUF names (globs for the core's ``rename``)
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.*.self_attn.q_proj.weight": "blk.*.attn_q.weight",
    "model.layers.*.self_attn.k_proj.weight": "blk.*.attn_k.weight",
    "model.layers.*.self_attn.v_proj.weight": "blk.*.attn_v.weight",
    "model.layers.*.self_attn.o_proj.weight": "blk.*.attn_output.weight",
    "model.layers.*.mlp.gate_proj.weight": "blk.*.ffn_gate.weight",
    "model.layers.*.mlp.up_proj.weight": "blk.*.ffn_up.weight",
    "model.layers.*.mlp.down_proj.weight": "blk.*.ffn_down.weight",
    "model.layers.*.input_layernorm.weight": "blk.*.attn_norm.weight",
    "model.layers.*.post_attention_layernorm.weight": "blk.*.ffn_norm.weight",
}


def gguf_name(key: str) -> str:
    """One Hugging Face Llama key under llama.cpp's name (the key itself when no rule names it)."""
    for hf, gg in GGUF_NAMES.items():
        found = re.fullmatch(re.escape(hf).replace(r"\*", r"(\d+)"), key)
        if found:
            return gg.replace("*", found.group(1)) if found.groups() else gg
    return key


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.fixture(scope="session")
def llama_cpp() -> SimpleNamespace:
    """llama.cpp's conversion of a Llama: ``renames`` (globs), ``name(key)`` and ``permute(w, n_head, n_head_kv)``."""
    return SimpleNamespace(renames=GGUF_NAMES, name=gguf_name, permute=llama_cpp_permute)
