"""``statebridge diff`` on pairs made with real libraries: a transformers checkpoint and what the core's steps make of it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.testing import run_cli, write_many_tensors
from statebridge_analysis.diff import DiffReport, Names, diff, similarity

LAYERS = 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama) -> Path:
    """A tiny random Llama as transformers saves it; q is 32 rows, k and v 16 (grouped-query attention)."""
    folder = tmp_path_factory.mktemp("diff") / "llama"
    tiny_llama(folder, layers=LAYERS)
    return folder


def _run(source: Path, target: Path, steps: list[dict]) -> Path:
    sb.run(source, steps, target, progress=False)
    return target


def _report(a: Path, b: Path) -> DiffReport:
    names = Names()
    with sb.open_source(a) as sa, sb.open_source(b) as sb_:
        report = DiffReport(str(a), str(b), diff(sa.metas(), sb_.metas(), names), names)
        _every_key_once(report.changes, sa.metas(), sb_.metas())
        return report


def _every_key_once(changes, ma, mb) -> None:
    """Nothing is left unexplained, and nothing is explained twice."""
    seen_a = Counter(k for c in changes for k in c.a)
    seen_b = Counter(k for c in changes for k in c.b)
    assert seen_a == Counter(list(ma)) and seen_b == Counter(list(mb))


def _rows(report: DiffReport) -> set[tuple[str, str, str, str]]:
    return {(r["kind"], r["a"], r["b"], r["detail"]) for r in report.folded()}


def test_the_same_checkpoint_is_unchanged(llama) -> None:
    report = _report(llama, llama)
    assert report.counts()["unchanged"] == 3 + 9 * LAYERS and sum(report.counts().values()) == 3 + 9 * LAYERS
    assert report.render().splitlines()[-1] == f"{3 + 9 * LAYERS} unchanged"


def test_renamed_to_gguf_names_pairs_every_family(llama, tmp_path, llama_cpp) -> None:
    renamed = _run(llama, tmp_path / "renamed.safetensors", [{"rename": {"pattern": p, "to": t}} for p, t in llama_cpp.renames.items()])
    report = _report(llama, renamed)
    assert report.counts()["renamed"] == 3 + 9 * LAYERS
    rows = _rows(report)
    assert ("renamed", "model.layers.{0..3}.self_attn.q_proj.weight", "blk.{0..3}.attn_q.weight", "") in rows
    assert ("renamed", "model.layers.{0..3}.self_attn.o_proj.weight", "blk.{0..3}.attn_output.weight", "") in rows
    assert ("renamed", "model.layers.{0..3}.post_attention_layernorm.weight", "blk.{0..3}.ffn_norm.weight", "") in rows
    assert ("renamed", "model.embed_tokens.weight", "token_embd.weight", "") in rows
    assert ("renamed", "lm_head.weight", "output.weight", "") in rows  # the same shape as the embedding: names decide
    assert ("renamed", "model.norm.weight", "output_norm.weight", "") in rows
    assert len(rows) == 12  # one row per family


def test_saved_as_gguf_by_the_core_is_read_back_and_paired(llama, tmp_path, llama_cpp) -> None:
    gguf = _run(llama, tmp_path / "llama.gguf", [{"rename": {"pattern": p, "to": t}} for p, t in llama_cpp.renames.items()])
    done = run_cli(["diff", str(llama), str(gguf), "--json"])
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["counts"]["renamed"] == 3 + 9 * LAYERS and data["counts"]["added"] == data["counts"]["removed"] == 0
    pairs = {(c["a"][0], c["b"][0]) for c in data["changes"]}
    assert ("model.layers.2.mlp.gate_proj.weight", "blk.2.ffn_gate.weight") in pairs
    assert ("model.layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight") in pairs
    text = run_cli(["diff", str(llama), str(gguf)]).stdout
    assert "  renamed       model.layers.{0..3}.mlp.down_proj.weight -> blk.{0..3}.ffn_down.weight  (confidence 1.00)" in text


def test_fused_qkv_and_gate_up_are_merges(llama, tmp_path) -> None:
    attn = [f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"]
    mlp = ["model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"]
    fused = _run(llama, tmp_path / "fused", [
        {"concat": {"inputs": attn, "output": "model.layers.*.self_attn.qkv_proj.weight"}},
        {"concat": {"inputs": mlp, "output": "model.layers.*.mlp.gate_up_proj.weight"}},
    ])
    report = _report(llama, fused)
    merged = [c for c in report.changes if c.kind == "merged"]
    assert {(frozenset(c.a), c.b[0]) for c in merged if c.b[0] == "model.layers.1.self_attn.qkv_proj.weight"} == {
        (frozenset(k.replace("*", "1") for k in attn), "model.layers.1.self_attn.qkv_proj.weight")
    }
    assert {c.b[0] for c in merged} == {f"model.layers.{i}.{n}" for i in range(LAYERS) for n in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")}
    assert report.counts() == {**dict.fromkeys(report.counts(), 0), "unchanged": 3 + 4 * LAYERS, "merged": 5 * LAYERS}
    assert all(c.detail.startswith("concatenated along dim 0: sizes") for c in merged)


def test_a_split_along_dim_1(llama, tmp_path) -> None:
    halves = ["model.layers.*.mlp.down_proj.left", "model.layers.*.mlp.down_proj.right"]
    split = _run(llama, tmp_path / "split.safetensors", [{"split": {"input": "model.layers.*.mlp.down_proj.weight", "outputs": halves, "dim": 1}}])
    report = _report(llama, split)
    assert ("split", "model.layers.{0..3}.mlp.down_proj.weight",
            "model.layers.{0..3}.mlp.down_proj.left + model.layers.{0..3}.mlp.down_proj.right", "along dim 1: sizes [24, 24]") in _rows(report)


def test_layers_shifted_are_moves(llama, tmp_path) -> None:
    keys = list(sb.open_source(llama).metas())
    mapping = {k: k.replace(f"layers.{i}.", f"layers.{i + 2}.") for k in keys for i in range(LAYERS) if f"layers.{i}." in k}
    shifted = _run(llama, tmp_path / "shifted.safetensors", [{"rename": {"mapping": mapping}}])
    report = _report(llama, shifted)
    assert report.counts()["moved"] == 9 * LAYERS and report.counts()["unchanged"] == 3
    assert ("moved", "model.layers.{0..3}.self_attn.q_proj.weight", "model.layers.{2..5}.self_attn.q_proj.weight", "layer +2") in _rows(report)


def test_prefix_dropped_is_a_move_and_casts_and_reshapes_are_named(llama, tmp_path) -> None:
    out = _run(llama, tmp_path / "moved.safetensors", [
        {"rename": {"pattern": "model.**", "to": "**"}},
        {"cast": {"dtype": "bf16", "pattern": "layers.*.mlp.up_proj.weight"}},
    ])
    report = _report(llama, out)
    rows = _rows(report)
    assert ("moved", "model.layers.{0..3}.self_attn.k_proj.weight", "layers.{0..3}.self_attn.k_proj.weight", "") in rows
    assert ("moved", "model.layers.{0..3}.mlp.up_proj.weight", "layers.{0..3}.mlp.up_proj.weight", "float32 -> bfloat16") in rows
    state = load_file(llama / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"].t().contiguous()
    state["model.norm.weight"] = state["model.norm.weight"].half()
    del state["model.layers.3.mlp.up_proj.weight"]
    state["model.layers.3.mlp.extra.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "edited.safetensors")
    report = _report(llama, tmp_path / "edited.safetensors")
    rows = _rows(report)
    assert ("shape_changed", "lm_head.weight", "lm_head.weight", "[96, 32] -> [32, 96] (transposed?)") in rows
    assert ("dtype_changed", "model.norm.weight", "model.norm.weight", "float32 -> float16") in rows
    assert ("removed", "model.layers.3.mlp.up_proj.weight", "", "") in rows
    assert ("added", "", "model.layers.3.mlp.extra.bias", "") in rows


def test_names_decide_between_tensors_of_one_shape() -> None:
    """q and o (and embeddings and the head) share shapes: the words of their names pair them."""
    def t(key: str) -> tuple[str, ...]:
        return Names()(key)[0]

    q, o = t("model.layers.0.self_attn.q_proj.weight"), t("model.layers.0.self_attn.o_proj.weight")
    assert similarity(q, t("blk.0.attn_q.weight")) == 1.0 > similarity(q, t("blk.0.attn_output.weight"))
    assert similarity(o, t("blk.0.attn_output.weight")) == 1.0
    assert similarity(t("lm_head.weight"), t("output.weight")) == 1.0 > similarity(t("lm_head.weight"), t("token_embd.weight"))
    assert similarity(t("a.weight"), t("a.bias")) == pytest.approx(1 / 3)  # {a} against {a, bias}, halved: not a weight


def _renamed_header_copy(source: Path, target: Path) -> None:
    """``source`` with every key's ``model.`` prefix dropped, written by hand: same data, new header."""
    with open(source, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    renamed = {k.removeprefix("model."): v for k, v in header.items()}
    raw = json.dumps(renamed, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_hundred_thousand_keys_fold_into_a_few_rows(tmp_path) -> None:
    """Test-sized check of the scale the lead benchmarks (100,000 keys a side, < 2 s): linear work, a few rows."""
    count = write_many_tensors(tmp_path / "a.safetensors", 100_000)
    _renamed_header_copy(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    report = _report(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert report.counts()["moved"] == count - 1 and report.counts()["unchanged"] == 1  # lm_head.weight has no prefix
    text = report.render().splitlines()
    assert len(text) == 2 + 10 + 1  # A, B, one row per moved family, the counts
    assert "  moved         model.layers.{0..63}.mlp.experts.{0..518}.gate_proj.weight -> layers.{0..63}.mlp.experts.{0..518}.gate_proj.weight  (confidence 1.00)" in text


def test_diff_reads_headers_only_never_torch_and_is_deterministic(llama, tmp_path) -> None:
    fused = _run(llama, tmp_path / "fused.safetensors", [
        {"concat": {"inputs": [f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"], "output": "model.layers.*.self_attn.qkv.weight"}},
        {"rename": {"pattern": "model.**", "to": "**"}},
    ])
    code = "import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); from statebridge.cli import main; sys.exit(main())"
    outputs = set()
    for seed in ("1", "2"):  # set iteration order changes with the hash seed; the report must not
        done = subprocess.run([sys.executable, "-c", code, "diff", str(llama), str(fused), "--json"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        body, torch_loaded = done.stdout.rsplit("\n", 2)[:2]
        assert torch_loaded == "False"
        outputs.add(body)
    assert len(outputs) == 1


def test_bad_input_is_one_line(llama, tmp_path) -> None:
    done = run_cli(["diff", str(llama), str(tmp_path / "nothing")])
    assert done.returncode == 2 and done.stderr.startswith("statebridge: error: ") and len(done.stderr.strip().splitlines()) == 1
