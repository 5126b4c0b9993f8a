"""``statebridge seeddelta eval``: a real transformers model folder (with its tokenizer), dense against seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import statebridge as sb
from statebridge.testing import run_cli

WORDS = [f"w{i}" for i in range(120)]
TEXT = " ".join(WORDS[(i * 37) % len(WORDS)] for i in range(400))  # 400 tokens, every word, no simple period


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer transformers Llama saved with ``save_pretrained`` (float16 values, held as float32), and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS) + 1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # values float16 can hold, so a SeedΔ layer keeping every entry is exact
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(root / "model")
    raw = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    done = run_cli(["seeddelta", "capture", str(root / "model"), "--text", str(root / "text.txt"),
                    "--out", str(root / "fit.safetensors")])
    assert done.returncode == 0, done.stderr
    return root


def build(root: Path, name: str, defaults: dict) -> Path:
    (root / f"{name}.json").write_text(json.dumps({"version": 1, "defaults": {
        "gating": {"min_mean": 0.0, "min_p05": None, "norm_ratio": None}, **defaults}}))
    out = root / f"{name}.gguf"
    done = run_cli(["seeddelta", "build", str(root / "model"), str(out), "--policy", str(root / f"{name}.json"),
                    "--activations", str(root / "fit.safetensors"), "--report-json", str(root / f"{name}.report.json")])
    assert done.returncode == 0, done.stderr
    return out


def evaluate(root: Path, seeded: Path, *extra: str) -> dict:
    done = run_cli(["seeddelta", "eval", str(root / "model"), str(seeded), "--text", str(root / "text.txt"),
                    "--chunk", "128", "--json", *extra])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_seeded_model_is_measured_against_the_dense_one_and_the_report_gets_the_figures(folder: Path) -> None:
    seeded = build(folder, "sparse", {"K": 8, "base": "none"})
    result = evaluate(folder, seeded, "--report", str(folder / "sparse.report.json"))
    assert result["layers_swapped"] == 6 and result["tokens"] == 400 and result["chunk"] == 128
    assert result["mean_kld"] > 1e-4 and 0.0 < result["same_top1"] < 1.0  # 8 of 64/128 entries: visibly changed
    assert result["p99_kld"] >= result["mean_kld"]
    with sb.open_source(folder / "model") as src:
        ffn = [m for k, m in src.metas().items() if ".mlp." in k]
    assert result["replaced_bytes_stored"] == sum(m.nbytes for m in ffn)  # float32 in the folder
    assert result["replaced_bytes_f16"] == sum(2 * m.numel for m in ffn)
    with sb.open_source(seeded) as src:
        delta = sum(m.nbytes for k, m in src.metas().items() if ".sd_" in k)
    assert result["seeddelta_bytes"] == delta > 0
    assert result["bytes_saved_if_stripped"] == result["replaced_bytes_stored"] - result["seeddelta_bytes"]
    report = json.loads((folder / "sparse.report.json").read_text())
    assert report["end_to_end"] == result and "layers" in report


def test_layers_that_keep_every_entry_give_the_dense_model_back(folder: Path) -> None:
    """The reference: K = in with float16-exact weights reproduces them, so the two runs agree token for token."""
    seeded = build(folder, "full", {"K": 128, "base": "none", "row_scale": False, "refit": False})
    result = evaluate(folder, seeded)
    assert result["layers_swapped"] == 6
    assert result["mean_kld"] < 1e-9 and result["same_top1"] == 1.0


def test_bad_inputs_get_one_line(folder: Path, tmp_path: Path) -> None:
    seeded = build(folder, "sparse2", {"K": 8, "base": "none"})
    (tmp_path / "not-a-report.json").write_text("[1, 2]")
    cases = [
        (["--report", str(tmp_path / "not-a-report.json")], "not a seeddelta build report"),
        (["--text", str(tmp_path / "missing.txt")], "missing.txt: cannot read the text"),
    ]
    for extra, message in cases:
        done = run_cli(["seeddelta", "eval", str(folder / "model"), str(seeded), "--text", str(folder / "text.txt"), *extra])
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
