"""Block Influence: exactly 0 for an inserted llama_pro block; the command stores it in a .tprog."""

from __future__ import annotations

import pytest

import json
import sys
from pathlib import Path

import statebridge as sb
from statebridge.testing import run_cli
from statebridge_progressive import tprog
from statebridge_progressive.depth import GrowDepth
from statebridge_progressive.importance import block_influence

sys.path.insert(0, str(Path(__file__).parent))
from models import TOKENS, load, save  # noqa: E402


def char_tokenizer(folder: Path) -> Path:
    """A character-level tokenizer (95 printable ASCII characters) saved as transformers saves one: no download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)} | {"<unk>": 95}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def test_an_inserted_llama_pro_block_has_zero_influence(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=4)
    sb.run(sb.plan(src, [GrowDepth(method="llama_pro", num_layers=6)]), None, tmp_path / "out", progress=False)
    scores = block_influence(load(tmp_path / "out"), [TOKENS])
    assert scores[2] == 0.0 and scores[5] == 0.0
    assert all(s > 0.01 for i, s in enumerate(scores) if i not in (2, 5))
    assert scores[:2] == block_influence(load(src), [TOKENS])[:2]  # the blocks before the first copy see the same states


@pytest.mark.slow  # fresh interpreters that import torch and transformers
def test_command_records_the_analysis_in_a_tprog(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=4)
    grown = tprog.grow(src, [GrowDepth(method="llama_pro", num_layers=6)], tmp_path / "m.tprog").target
    char_tokenizer(grown / "tokenizer")
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    done = run_cli(["grow", "importance", str(grown), "--text", str(tmp_path / "calib.txt"), "--duplicate", "2", "--json"])
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    meta = tprog.read_meta(grown)
    assert meta.layer_analysis.importance_scores == printed["layer_analysis"]["importance_scores"]
    assert meta.layer_analysis.importance_scores[2] == 0.0 and meta.layer_analysis.calibration_tokens == 360
    picked = meta.recommended_expansion.layer_duplication_indices
    assert len(picked) == 2 and 2 in picked and not {0, 5} & set(picked)  # the zero-influence copy; never first or last
    bad = run_cli(["grow", "importance", str(src), "--text", str(tmp_path / "calib.txt")])  # no tokenizer there
    assert bad.returncode == 2 and "no tokenizer" in bad.stderr and bad.stderr.strip().count("\n") == 0
