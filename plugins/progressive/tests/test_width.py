"""grow_width on real transformers models: the widened model computes the same logits (max |Δ| ≤ 1e-4, float32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb
from statebridge.testing import run_cli
from statebridge_progressive.width import GrowWidth

sys.path.insert(0, str(Path(__file__).parent))
from models import load, logits, save  # noqa: E402


def widen(src: Path, out: Path, **params) -> sb.Plan:
    built = sb.plan(src, [GrowWidth(head_dim=16, **params)])
    sb.run(built, None, out, progress=False)
    return built


def max_delta(a: Path, b: Path) -> float:
    return float((logits(a) - logits(b)).abs().max())


CASES = {
    "factor2": dict(factor=2),
    "64to96": dict(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=3),
    "64to96-more-queries": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2),
    "gqa-to-mha": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
def test_widening_keeps_the_function(tmp_path: Path, family: str, case: str) -> None:
    src = save(family, tmp_path / "src", layers=2, kv_heads=2)
    widen(src, tmp_path / "out", **CASES[case])
    model = load(tmp_path / "out")
    expected = CASES[case].get("hidden_size", 128)
    assert model.config.hidden_size == expected
    assert model.model.embed_tokens.weight.shape[1] == expected
    assert max_delta(src, tmp_path / "out") <= 1e-4


def test_factor_two_clones_as_hypercloning(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=1, kv_heads=2)
    widen(src, tmp_path / "out", factor=2)
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    e = a["model.embed_tokens.weight"]
    assert torch.equal(b["model.embed_tokens.weight"], torch.cat([e, e], 1))
    w = a["lm_head.weight"]
    assert torch.equal(b["lm_head.weight"], torch.cat([w, w], 1) / 2)
    n = a["model.norm.weight"]
    assert torch.equal(b["model.norm.weight"], torch.cat([n, n]))
    assert b["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 16, 128)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 4, 16)
    assert config["rms_norm_eps"] == json.loads((src / "config.json").read_text())["rms_norm_eps"]


def test_zero_extension_rescales_norms_and_epsilon(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=1, kv_heads=2)
    widen(src, tmp_path / "out", hidden_size=96)
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert not b["model.embed_tokens.weight"][:, 64:].any()
    assert not b["model.layers.0.mlp.down_proj.weight"][64:].any()
    torch.testing.assert_close(b["model.norm.weight"][:64], a["model.norm.weight"] * (64 / 96) ** 0.5)
    eps = json.loads((tmp_path / "out/config.json").read_text())["rms_norm_eps"]
    assert eps == pytest.approx(1e-6 * 64 / 96)
    assert json.loads((tmp_path / "out/config.json").read_text())["head_dim"] == 16  # 96 / 4 heads would be 24


def test_head_size_is_written_where_the_config_derived_it(tmp_path: Path) -> None:
    src = save("qwen2", tmp_path / "src", layers=1, kv_heads=2)  # Qwen2's config has no head_dim: hidden / heads
    built = sb.plan(src, [GrowWidth(head_dim=16, hidden_size=96)])
    assert built.folder.edits == {"hidden_size": 96, "head_dim": 16, "rms_norm_eps": pytest.approx(1e-6 * 64 / 96)}


def test_tied_embeddings_widen_by_zero_extension(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2, kv_heads=2, tied=True)
    widen(src, tmp_path / "out", factor=2)
    assert load(tmp_path / "out").config.tie_word_embeddings
    assert max_delta(src, tmp_path / "out") <= 1e-4
    with pytest.raises(sb.PlanError, match="tied embeddings would multiply the logits"):
        sb.plan(src, [GrowWidth(head_dim=16, factor=2, residual="clone")])


@pytest.mark.parametrize("case", ["factor2", "64to96"])
def test_symmetry_breaking_noise_keeps_the_function(tmp_path: Path, case: str) -> None:
    src = save("llama", tmp_path / "src", layers=2, kv_heads=2)
    widen(src, tmp_path / "quiet", **CASES[case])
    widen(src, tmp_path / "noisy", noise_std=0.05, seed=1, **CASES[case])
    quiet, noisy = load_file(tmp_path / "quiet/model.safetensors"), load_file(tmp_path / "noisy/model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert float((quiet[key] - noisy[key]).abs().max()) > 0.01  # the copies differ ...
    assert max_delta(src, tmp_path / "noisy") <= 1e-4  # ... and the function does not


def test_head_size_change_is_refused_unless_asked(tmp_path: Path) -> None:
    with pytest.raises(sb.ConfigError, match="new_head_dim 32 changes the head size 16.*function_preserving: false"):
        GrowWidth(head_dim=16, new_head_dim=32)
    src = save("llama", tmp_path / "src", layers=1, kv_heads=2)
    built = widen(src, tmp_path / "out", hidden_size=128, new_head_dim=32, function_preserving=False)
    assert any("function_preserving: false" in op for g in built.groups for op in g.ops)
    assert load(tmp_path / "out").config.head_dim == 32


def test_impossible_sizes_are_one_line_errors(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=1, kv_heads=2)
    with pytest.raises(sb.PlanError, match="hidden_size 48 is smaller than the current 64"):
        sb.plan(src, [GrowWidth(head_dim=16, hidden_size=48)])
    eight = save("llama", tmp_path / "eight", layers=1, heads=8, kv_heads=2)  # groups of 4 query heads
    with pytest.raises(sb.PlanError, match="leave old key/value head 1 3 query slots for its 4 query heads"):
        sb.plan(eight, [GrowWidth(head_dim=8, num_attention_heads=9, num_key_value_heads=3)])
    with pytest.raises(sb.PlanError, match="head_dim 8 is not config.json's head size 16"):
        sb.plan(src, [GrowWidth(head_dim=8, factor=2)])
    gemma = save("gemma", tmp_path / "gemma", layers=1, kv_heads=1)
    with pytest.raises(sb.PlanError, match="sqrt\\(hidden_size\\)"):
        sb.plan(gemma, [GrowWidth(head_dim=16, factor=2)])


@pytest.mark.slow  # fresh interpreters that import torch and transformers
def test_command_line_reads_the_head_size_from_the_folder(tmp_path: Path) -> None:
    src = save("qwen2", tmp_path / "src", layers=1, kv_heads=2)
    done = run_cli(["grow", "width", str(src), str(tmp_path / "out"), "--hidden-size", "96"])
    assert done.returncode == 0, done.stderr
    assert max_delta(src, tmp_path / "out") <= 1e-4
    bad = run_cli(["grow", "width", str(src), str(tmp_path / "bad"), "--factor", "2", "--new-head-dim", "32"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "function_preserving" in bad.stderr
    missing = run_cli(["grow", "width", str(tmp_path / "nope"), str(tmp_path / "never"), "--factor", "2"])
    assert missing.returncode == 2 and missing.stderr.strip() == f"statebridge: error: {tmp_path / 'nope'}: no such file or folder"
    assert not (tmp_path / "never").exists()
