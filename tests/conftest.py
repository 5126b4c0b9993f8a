"""Shared fixtures: small real checkpoints written by the real libraries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from statebridge.testing import LlamaShape, llama_state_dict


@pytest.fixture
def llama_sd() -> dict[str, torch.Tensor]:
    """A two-layer llama-style state dict (float32)."""
    return llama_state_dict(LlamaShape(layers=2))


@pytest.fixture
def llama_file(tmp_path: Path, llama_sd) -> Path:
    """The same state dict written by ``safetensors.torch.save_file``."""
    path = tmp_path / "llama.safetensors"
    save_file(llama_sd, path, metadata={"format": "pt"})
    return path


def read_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
