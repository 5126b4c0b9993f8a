"""What the analysis tests share: a tiny random Llama saved by transformers itself (config.json and model.safetensors)."""

from __future__ import annotations

from pathlib import Path

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
