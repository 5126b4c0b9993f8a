"""Small real models and real PEFT adapters for the plugin's tests, and PEFT's own merge as the reference.

Every model is built from a tiny config with a fixed seed and saved with ``save_pretrained``;
every adapter is a real ``PeftModel`` (``init_lora_weights=False``, so ``lora_B`` is not zero)
saved with ``save_pretrained``.  The reference is what PEFT gives: ``PeftModel.from_pretrained``
on a fresh base, then ``merge_and_unload()`` (PEFT's default path) or its unmerged forward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
)

import statebridge as sb
from statebridge_lora.transforms import LoraMerge

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def llama(path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A two-layer llama folder (config.json + model.safetensors), seeded."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, **overrides)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    return path


def gpt2(path: Path) -> Path:
    """A two-layer GPT-2 folder: its attention and MLP are Conv1D (weights stored transposed)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def bert(path: Path) -> Path:
    """A two-layer BERT sequence classifier folder (keys under ``bert.``, a ``classifier`` head)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=32, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


MODELS = {"gpt2": GPT2LMHeadModel, "bert": BertForSequenceClassification, "llama": LlamaForCausalLM}


def load_model(path: Path) -> nn.Module:
    """The transformers model of folder ``path``, in eval mode."""
    kind = json.loads((path / "config.json").read_text())["model_type"]
    return MODELS[kind].from_pretrained(path).eval()


def make_adapter(base: Path, out: Path, seed: int = 1, perturb: Callable[[nn.Module], None] | None = None,
                 safe_serialization: bool = True, **config) -> Path:
    """A PEFT LoRA adapter over model folder ``base``, saved to ``out``; random non-zero ``B``."""
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:  # trained away from their initial values
                p.add_(torch.randn_like(p) * 0.1)
        if perturb is not None:
            perturb(model)
    model.save_pretrained(out, safe_serialization=safe_serialization)
    return out


def peft_merged(base: Path, adapter: Path, **merge) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload`` state dict of ``adapter`` over a fresh ``base``."""
    model = PeftModel.from_pretrained(load_model(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload(**merge).state_dict().items()}


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """The unmerged PeftModel's logits on :data:`TOKENS`."""
    model = PeftModel.from_pretrained(load_model(base), adapter).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def merged_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder)(TOKENS).logits


def our_merge(base: Path, out: Path, **params) -> tuple[dict[str, torch.Tensor], LoraMerge]:
    """Run ``lora_merge`` from ``base`` into folder ``out``; the merged tensors and the step (for its report)."""
    step = LoraMerge(**params)
    sb.run(base, [step], out, progress=False)
    return load_file(out / "model.safetensors"), step


def differences(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bitwise equal (torch.equal), or that only one side has (tied ones aside)."""
    bad = [k for k in ours if k in reference and not torch.equal(ours[k], reference[k])]
    bad += [f"only ours: {k}" for k in ours if k not in reference]
    bad += [f"only PEFT's: {k}" for k in reference if k not in ours and not _tied(k)]
    return bad


def _tied(key: str) -> bool:
    return key == "lm_head.weight"  # GPT-2 ties it to wte and does not save it


class ConvNet(nn.Module):
    """A module with Conv2d (3x3 and 1x1), Conv1d and Linear layers, for PEFT's conv merges."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.point(torch.relu(self.conv(x))))
        x = torch.relu(self.seq(x.flatten(2)))
        return self.head(x.mean(-1))


def convnet(path: Path) -> tuple[Path, ConvNet]:
    torch.manual_seed(0)
    model = ConvNet()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model
