"""grow_depth on real transformers models: llama_pro keeps the function bit for bit; slices and duplicate give loadable stacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb
from statebridge.testing import run_cli
from statebridge_progressive.depth import GrowDepth

sys.path.insert(0, str(Path(__file__).parent))
from models import load, logits, save  # noqa: E402


def grow(src: Path, out: Path, **params) -> sb.Plan:
    built = sb.plan(src, [GrowDepth(**params)])
    sb.run(built, None, out, progress=False)
    return built


@pytest.mark.parametrize("family,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2), ("gemma", 1)],
                         ids=["llama", "llama-gqa", "qwen2-gqa", "gemma-mqa"])
def test_llama_pro_is_bitwise_the_same_function(tmp_path: Path, family: str, kv_heads: int) -> None:
    src = save(family, tmp_path / "src", layers=4, kv_heads=kv_heads)
    grow(src, tmp_path / "out", method="llama_pro", num_layers=6)
    model = load(tmp_path / "out")
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    assert torch.equal(logits(tmp_path / "out"), logits(src))
    config = json.loads((tmp_path / "out/config.json").read_text())
    if "layer_types" in config:
        assert len(config["layer_types"]) == 6


def test_llama_pro_layout_matches_llama_pro_and_copies_bytes(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=4)
    built = grow(src, tmp_path / "out", method="llama_pro", num_layers=6)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    # LLaMA-Pro with split 2: blocks 0, 1, copy of 1, 2, 3, copy of 3
    for new, old in enumerate([0, 1, 1, 2, 3, 3]):
        for name in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(after[f"model.layers.{new}.{name}"], before[f"model.layers.{old}.{name}"])
    for new in (2, 5):
        assert not after[f"model.layers.{new}.self_attn.o_proj.weight"].any()
        assert not after[f"model.layers.{new}.mlp.down_proj.weight"].any()
    assert torch.equal(after["model.layers.3.self_attn.o_proj.weight"], before["model.layers.2.self_attn.o_proj.weight"])
    spans = {k: s for g in built.groups for k, s in built.raw_spans(g).items()}
    assert all(k in spans for g in built.groups for k in g.outputs)  # nothing is computed: bytes, or zero bytes
    zeros = sorted(k for k, s in spans.items() if s[0].path is None)
    assert zeros == sorted(f"model.layers.{n}.{m}.weight" for n in (2, 5) for m in ("self_attn.o_proj", "mlp.down_proj"))
    assert len(after) == len(before) + 2 * 9


def test_llama_pro_spreads_copies_when_the_split_is_not_whole(tmp_path: Path) -> None:
    step = GrowDepth(method="llama_pro", num_layers=7)
    # 5 blocks, 2 copies: after blocks 5*1//2 - 1 = 1 and 5*2//2 - 1 = 4, the last one last as in LLaMA-Pro
    assert step.layout(5) == [(0, "copy"), (1, "copy"), (1, "zeroed"), (2, "copy"), (3, "copy"), (4, "copy"), (4, "zeroed")]


def test_slices_load_with_the_edited_config(tmp_path: Path) -> None:
    src = save("qwen2", tmp_path / "src", layers=4)
    grow(src, tmp_path / "out", method="slices", slices=[[0, 3], [1, 4]])
    model = load(tmp_path / "out")
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        assert torch.equal(after[f"model.layers.{new}.mlp.gate_proj.weight"], before[f"model.layers.{old}.mlp.gate_proj.weight"])


def test_slices_that_drop_blocks_say_so(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=4)
    built = grow(src, tmp_path / "out", method="slices", slices=[[0, 2], [3, 4]])
    assert sorted({k.split(".")[2] for k in built.dropped}) == ["2"]
    assert load(tmp_path / "out").config.num_hidden_layers == 3


def test_per_layer_lists_are_reindexed(tmp_path: Path) -> None:
    src = save("qwen2", tmp_path / "src", layers=4)
    config = json.loads((src / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config["sliding_window"] = 8
    (src / "config.json").write_text(json.dumps(config))
    grow(src, tmp_path / "out", method="duplicate", indices=[1, 1, 2])
    out = json.loads((tmp_path / "out/config.json").read_text())
    assert out["layer_types"] == ["full_attention", *["sliding_attention"] * 3, "full_attention", "full_attention",
                                  "sliding_attention"]
    assert load(tmp_path / "out").config.num_hidden_layers == 7


def test_duplicate_noise_is_seeded_and_only_on_copies(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=3)
    grow(src, tmp_path / "a", method="duplicate", indices=[1], noise_std=0.01, seed=3)
    grow(src, tmp_path / "b", method="duplicate", indices=[1], noise_std=0.01, seed=3)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "a/model.safetensors")
    key = "self_attn.q_proj.weight"
    assert torch.equal(after[f"model.layers.1.{key}"], before[f"model.layers.1.{key}"])
    delta = after[f"model.layers.2.{key}"] - before[f"model.layers.1.{key}"]
    assert 0.008 < float(delta.std()) < 0.012
    assert torch.equal(after[f"model.layers.3.{key}"], before[f"model.layers.2.{key}"])


def test_bad_parameters_are_one_line_errors(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=4)
    with pytest.raises(sb.ConfigError, match="method 'llama_pro' needs 'num_layers'"):
        GrowDepth(method="llama_pro")
    with pytest.raises(sb.PlanError, match="zero: 'c_proj' names no module of block 0"):
        sb.plan(src, [GrowDepth(method="llama_pro", num_layers=6, zero=["c_proj"])])
    with pytest.raises(sb.PlanError, match=r"slice \[2, 9\] is not a range of blocks 0..4"):
        sb.plan(src, [GrowDepth(method="slices", slices=[[2, 9]])])
    with pytest.raises(sb.PlanError, match="num_layers 3 does not grow a model of 4 blocks"):
        sb.plan(src, [GrowDepth(method="llama_pro", num_layers=3)])


@pytest.mark.slow  # three fresh interpreters
def test_command_line(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    done = run_cli(["grow", "depth", str(src), str(tmp_path / "out"), "--method", "llama_pro", "--num-layers", "4"])
    assert done.returncode == 0, done.stderr
    assert load(tmp_path / "out").config.num_hidden_layers == 4
    dry = run_cli(["grow", "depth", str(src), str(tmp_path / "dry"), "--method", "slices", "--slices", "0:2,1:2", "--dry-run"])
    assert dry.returncode == 0 and "num_hidden_layers: 2 -> 3" in dry.stdout and not (tmp_path / "dry").exists()
    bad = run_cli(["grow", "depth", str(src), str(tmp_path / "bad"), "--method", "slices", "--slices", "0-2"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--slices '0-2'" in bad.stderr


def test_llama_pro_is_raw_bytes_only_and_never_imports_torch(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=4)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "statebridge", "grow", "depth", str(src),
                           str(tmp_path / "out"), "--method", "llama_pro", "--num-layers", "6"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
    assert "57 tensors (57 copied as raw bytes)" in done.stdout  # 6 blocks of 9 and 3 others: zeros included


def test_llama_pro_with_other_names_keeps_gpt2_exactly(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=3, n_head=4)).save_pretrained(tmp_path / "src")
    grow(tmp_path / "src", tmp_path / "out", method="llama_pro", num_layers=6, zero=["attn.c_proj", "mlp.c_proj"])
    grown = load_file(tmp_path / "out/model.safetensors")
    assert not grown["transformer.h.1.attn.c_proj.bias"].any() and not grown["transformer.h.1.mlp.c_proj.weight"].any()
    assert json.loads((tmp_path / "out/config.json").read_text())["n_layer"] == 6
    assert torch.equal(logits(tmp_path / "out"), logits(tmp_path / "src"))


def test_nested_configs_are_edited_only_where_they_count_the_blocks() -> None:
    from statebridge_progressive.layers import per_layer_edits

    nested = {"model_type": "x", "text_config": {"num_hidden_layers": 2, "layer_types": ["a", "b"]},
              "vision_config": {"num_hidden_layers": 5}}
    assert per_layer_edits(nested, 2, [0, 1, 1]) == {
        "text_config": {"num_hidden_layers": 3, "layer_types": ["a", "b", "b"]}}
    top = {"num_hidden_layers": 2, "vision_config": {"num_hidden_layers": 2}}
    assert per_layer_edits(top, 2, [0, 0, 1]) == {"num_hidden_layers": 3}
    with pytest.raises(sb.PlanError, match="'text_config' and 'vision_config' both count 2 blocks"):
        per_layer_edits({"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 2}}, 2, [0, 1, 1])
