"""lora_extract against the real PEFT: the extracted adapter loads with PeftModel.from_pretrained and merges back to the tuned weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.testing import run_cli
from statebridge_lora.extract import LoraExtract, extract_adapter

sys.path.insert(0, str(Path(__file__).parent))
from peft_cases import gpt2, llama, peft_merged  # noqa: E402


def tune(base: Path, out: Path, edit) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of model folder ``base`` with ``edit(weights)`` applied, as a tuned model folder."""
    weights = load_file(base / "model.safetensors")
    torch.manual_seed(7)
    edit(weights)
    out.mkdir()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((base / "config.json").read_text())
    return out, weights


def full_rank_changes(w: dict[str, torch.Tensor]) -> None:
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        w[key] += 0.05 * torch.randn_like(w[key])
    w["model.layers.1.post_attention_layernorm.weight"] += 0.1
    w["model.embed_tokens.weight"][3] += 1.0


def test_full_rank_extraction_merges_back_to_the_tuned_weights(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")
    tuned, expected = tune(base, tmp_path / "tuned", full_rank_changes)
    report = extract_adapter(str(base), str(tuned), str(tmp_path / "ad"), rank=64)
    config = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert config["target_modules"] == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert config["modules_to_save"] == ["model.embed_tokens", "model.layers.1.post_attention_layernorm"]
    saved = load_file(tmp_path / "ad/adapter_model.safetensors")
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (32, 48)  # full rank: min(32, 48)
    assert not any("k_proj" in k or "input_layernorm" in k for k in saved)  # unchanged: left out
    merged = peft_merged(base, tmp_path / "ad")
    for key, value in expected.items():
        error = torch.linalg.vector_norm(merged[key] - value) / torch.linalg.vector_norm(value)
        assert error < 1e-5, (key, float(error))
    assert "16 tensors unchanged (left out)" in report.render()


def test_a_layer_whose_bias_changed_too_is_saved_whole(tmp_path: Path) -> None:
    """PEFT puts no LoRA on a module in modules_to_save: such a layer's weight goes whole, with its bias."""
    base = llama(tmp_path / "base", attention_bias=True)

    def weight_and_bias(w: dict[str, torch.Tensor]) -> None:
        w["model.layers.0.self_attn.v_proj.weight"] += 0.05 * torch.randn_like(w["model.layers.0.self_attn.v_proj.weight"])
        w["model.layers.0.self_attn.v_proj.bias"] += 0.1
        w["model.layers.1.self_attn.k_proj.weight"] += 0.05 * torch.randn_like(w["model.layers.1.self_attn.k_proj.weight"])

    tuned, expected = tune(base, tmp_path / "tuned", weight_and_bias)
    extract_adapter(str(base), str(tuned), str(tmp_path / "ad"), rank=64)
    config = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.k_proj"]
    assert config["modules_to_save"] == ["model.layers.0.self_attn.v_proj"]
    merged = peft_merged(base, tmp_path / "ad")
    for key in ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj.bias"):
        assert torch.equal(merged[key], expected[key])
    torch.testing.assert_close(merged["model.layers.1.self_attn.k_proj.weight"], expected["model.layers.1.self_attn.k_proj.weight"],
                               atol=1e-5, rtol=1e-5)


def test_energy_target_chooses_each_module_rank(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")

    def low_rank_changes(w: dict[str, torch.Tensor]) -> None:
        q = "model.layers.0.self_attn.q_proj.weight"
        w[q] += torch.randn(32, 2) @ torch.randn(2, 32) * 0.1  # rank 2
        up = "model.layers.0.mlp.up_proj.weight"
        w[up] += torch.randn(48, 5) @ torch.randn(5, 32) * 0.1  # rank 5

    tuned, expected = tune(base, tmp_path / "tuned", low_rank_changes)
    extract_adapter(str(base), str(tuned), str(tmp_path / "ad"), rank=16, energy=0.999999)
    config = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert config["r"] == 5 and config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2}
    assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == 5
    merged = peft_merged(base, tmp_path / "ad")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(merged[key], expected[key], atol=1e-5, rtol=1e-5)


def test_threshold_drops_small_singular_values(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")

    def two_scales(w: dict[str, torch.Tensor]) -> None:
        u, v = torch.linalg.qr(torch.randn(32, 2))[0], torch.linalg.qr(torch.randn(32, 2))[0]
        w["model.layers.0.self_attn.o_proj.weight"] += u @ torch.diag(torch.tensor([1.0, 1e-4])) @ v.T

    tuned, _ = tune(base, tmp_path / "tuned", two_scales)
    extract_adapter(str(base), str(tuned), str(tmp_path / "ad"), rank=8, threshold=1e-3)
    assert json.loads((tmp_path / "ad/adapter_config.json").read_text())["r"] == 1


def test_randomized_svd_for_large_matrices_is_seeded_and_exact_on_low_rank(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")

    def rank3(w: dict[str, torch.Tensor]) -> None:
        w["model.layers.1.mlp.gate_proj.weight"] += torch.randn(48, 3) @ torch.randn(3, 32)

    tuned, expected = tune(base, tmp_path / "tuned", rank3)
    step = LoraExtract(base=str(base), rank=3, randomized_above=8, ranks={"model.layers.1.mlp.gate_proj": 3}, save=[])
    sb.run(tuned, [step], tmp_path / "a.safetensors", progress=False)
    sb.run(tuned, [LoraExtract(step.params)], tmp_path / "b.safetensors", progress=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    (record,) = step.records.values()
    assert record.randomized and record.rank == 3 and record.error < 1e-5
    out = load_file(tmp_path / "a.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.gate_proj"
    torch.testing.assert_close(out[f"{prefix}.lora_B.weight"] @ out[f"{prefix}.lora_A.weight"],
                               expected["model.layers.1.mlp.gate_proj.weight"] - load_file(base / "model.safetensors")["model.layers.1.mlp.gate_proj.weight"],
                               atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_extraction_with_fan_in_fan_out(tmp_path: Path) -> None:
    base = gpt2(tmp_path / "base")

    def change(w: dict[str, torch.Tensor]) -> None:
        w["transformer.h.0.attn.c_attn.weight"] += 0.05 * torch.randn_like(w["transformer.h.0.attn.c_attn.weight"])

    tuned, expected = tune(base, tmp_path / "tuned", change)
    extract_adapter(str(base), str(tuned), str(tmp_path / "ad"), rank=32, fan_in_fan_out=True)
    merged = peft_merged(base, tmp_path / "ad")
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.linalg.vector_norm(merged[key] - expected[key]) / torch.linalg.vector_norm(expected[key]) < 1e-5


def test_the_step_alone_pads_to_the_declared_rank_and_drops_the_rest(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")
    tuned, _ = tune(base, tmp_path / "tuned", lambda w: w["model.norm.weight"].add_(1))
    built = sb.plan(tuned, [LoraExtract(base=str(base), rank=4, energy=0.5)])
    outputs = dict(built.outputs)
    assert outputs["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert outputs["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert "base_model.model.model.norm.weight" in outputs and "model.norm.weight" not in outputs
    assert "base_model.model.model.embed_tokens.weight" in outputs  # an embedding: carried whole, not factorised


def test_identical_checkpoints_and_mismatches_are_errors(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")
    with pytest.raises(sb.PlanError, match="holds the same tensors as"):
        extract_adapter(str(base), str(base), str(tmp_path / "ad"), rank=4)
    other = gpt2(tmp_path / "gpt2")
    with pytest.raises(sb.PlanError, match="hold different keys"):
        extract_adapter(str(base), str(other), str(tmp_path / "ad"), rank=4)


@pytest.mark.slow  # a fresh interpreter that imports torch and transformers: about 5 s
def test_command_writes_an_adapter_folder(tmp_path: Path) -> None:
    base = llama(tmp_path / "base")
    tuned, expected = tune(base, tmp_path / "tuned", full_rank_changes)
    done = run_cli(["lora", "extract", str(base), str(tuned), str(tmp_path / "ad"), "--rank", "64"])
    assert done.returncode == 0, done.stderr
    assert "model.layers.0.self_attn.q_proj" in done.stdout and "modules_to_save: model.embed_tokens" in done.stdout
    merged = peft_merged(base, tmp_path / "ad")
    torch.testing.assert_close(merged["lm_head.weight"], expected["lm_head.weight"], atol=1e-5, rtol=1e-5)
    again = run_cli(["lora", "extract", str(base), str(tuned), str(tmp_path / "ad"), "--rank", "64"])
    assert again.returncode == 2 and "--overwrite" in again.stderr
