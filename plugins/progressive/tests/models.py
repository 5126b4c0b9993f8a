"""Tiny random transformers models saved as model folders, and their logits: what the growth tests compare."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config, Qwen2ForCausalLM
from transformers import GemmaForCausalLM, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

#: a fixed batch of token ids (two sequences of 12)
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 77, 4, 8, 15, 16, 23, 42], [3, 1, 4, 1, 5, 9, 2, 6, 53, 58, 97, 93]])


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, norms included (an all-ones norm would hide a wrong norm rescaling)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def save(family: str, path: Path, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
         intermediate: int = 128, seed: int = 0, tied: bool = False) -> Path:
    """A random ``family`` model (llama, qwen2, qwen3, gemma) saved with save_pretrained (float32, safetensors)."""
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate, vocab_size=128, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "qwen3":  # per-head q_norm / k_norm
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=hidden // heads))
    elif family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common, head_dim=hidden // heads))
    else:
        raise ValueError(family)
    _randomize(model, seed)
    model.save_pretrained(path)
    return path


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(path)(TOKENS).logits
