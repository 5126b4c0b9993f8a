"""One config composes plugins: lora_merge, then grow_depth, then cast, in one streamed run, equal to PEFT's merge grown the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb
from statebridge.testing import run_cli
from statebridge_progressive.depth import GrowDepth

pytest.importorskip("statebridge_lora", reason="the composition needs the lora plugin")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from models import TOKENS, load, save  # noqa: E402


@pytest.mark.slow  # fresh interpreters that import torch and transformers
def test_lora_merge_then_grow_depth_then_cast_is_peft_merged_then_grown(tmp_path: Path) -> None:
    base = save("llama", tmp_path / "base", layers=4)
    torch.manual_seed(1)
    peft_model = get_peft_model(load(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules=["q_proj", "o_proj", "down_proj", "up_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "grow.yaml"
    config.write_text(
        "source: base\ntarget: out\nsteps:\n"
        "  - lora_merge: {adapter: adapter}\n"
        "  - grow_depth: {method: llama_pro, num_layers: 6}\n"
        "  - cast: {dtype: bfloat16}\n"
    )
    done = run_cli(["run", str(config)])
    assert done.returncode == 0, done.stderr

    merged = PeftModel.from_pretrained(load(base), tmp_path / "adapter").merge_and_unload()  # PEFT's own merge
    merged.save_pretrained(tmp_path / "peft")
    sb.run(sb.plan(tmp_path / "peft", [GrowDepth(method="llama_pro", num_layers=6), sb.Cast(dtype="bfloat16")]),
           None, tmp_path / "reference", progress=False)
    ours, reference = load_file(tmp_path / "out/model.safetensors"), load_file(tmp_path / "reference/model.safetensors")
    assert ours.keys() == reference.keys() and len(ours) == 3 + 6 * 9
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    out_config = json.loads((tmp_path / "out/config.json").read_text())
    assert out_config["num_hidden_layers"] == 6 and out_config["dtype"] == "bfloat16"
    # and, as a function, the grown model is PEFT's merged model in bfloat16, bit for bit
    sb.run(sb.plan(tmp_path / "peft", [sb.Cast(dtype="bfloat16")]), None, tmp_path / "peft-bf16", progress=False)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "out")(TOKENS).logits, load(tmp_path / "peft-bf16")(TOKENS).logits)
