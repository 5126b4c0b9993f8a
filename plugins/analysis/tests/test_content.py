"""``statebridge diff A B --content`` on a real transformers Llama and copies edited with safetensors and torch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.testing import run_cli, run_cli_peak
from statebridge_analysis.content import content_diff, describe_permutation, rotary_permutation
from statebridge_analysis.diff import KINDS, DiffReport, compare
from statebridge_analysis.html import COLOURS

LAYERS = 4
HEADS, KV_HEADS = 4, 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama) -> Path:
    """A tiny random Llama as transformers saves it: q 32 rows in 4 heads, k and v 16 rows in 2 (grouped-query attention)."""
    folder = tmp_path_factory.mktemp("content") / "llama"
    tiny_llama(folder, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS)
    return folder


def _state(llama: Path) -> dict[str, torch.Tensor]:
    return load_file(llama / "model.safetensors")


def _content(a: Path, b: Path) -> DiffReport:
    with sb.open_source(a) as sa, sb.open_source(b) as sb_:
        report = content_diff(compare(sa, sb_), sa, sb_)
        assert sorted(k for c in report.changes for k in c.a) == sorted(sa.metas())  # every key once
        assert sorted(k for c in report.changes for k in c.b) == sorted(sb_.metas())
        return report


def _pairs(report: DiffReport) -> dict[tuple[str, str], tuple[str, str]]:
    return {(c.a[0], c.b[0]): (c.kind, c.detail) for c in report.changes if c.a and c.b}


def test_renames_no_name_explains_are_paired_by_content(llama, tmp_path) -> None:
    """Opaque names (letters only, shuffled): headers can pair only by shapes, which q/o, k/v, norms and layers share."""
    state = _state(llama)
    keys = list(state)
    order = list(range(len(keys)))
    random.Random(1).shuffle(order)
    opaque = {k: "w." + "".join(chr(97 + int(d)) for d in f"{i:03d}") for k, i in zip(keys, order)}
    save_file({opaque[k]: v for k, v in state.items()}, tmp_path / "opaque.safetensors")
    headers_only = {(c.a[0], c.b[0]) for c in _content_free(llama, tmp_path / "opaque.safetensors") if c.a and c.b}
    assert not set(opaque.items()) <= headers_only  # names cannot do it
    report = _content(llama, tmp_path / "opaque.safetensors")
    pairs = _pairs(report)
    renamed = {k: opaque[k] for k in keys if "norm" not in k}  # norms are all ones: equal content, any pairing of them is right
    assert {(x, y) for x, y in pairs if "norm" not in x} == set(renamed.items())
    assert all(torch.equal(state[x], state[next(k for k, o in opaque.items() if o == y)]) for x, y in pairs)
    assert all(kind == "renamed" and detail in ("paired by content", "content equal") for kind, detail in pairs.values())
    assert report.counts()["renamed"] == len(keys)


def _content_free(a: Path, b: Path):
    with sb.open_source(a) as sa, sb.open_source(b) as sb_:
        return compare(sa, sb_).changes


def test_transposes_are_found_under_the_same_name_and_under_another(llama, tmp_path) -> None:
    state = _state(llama)
    state["lm_head.weight"] = state["lm_head.weight"].t().contiguous()
    for i in range(LAYERS):
        state[f"model.layers.{i}.mlp.wo_t.weight"] = state.pop(f"model.layers.{i}.mlp.down_proj.weight").t().contiguous()
    save_file(state, tmp_path / "transposed.safetensors")
    report = _content(llama, tmp_path / "transposed.safetensors")
    pairs = _pairs(report)
    assert pairs[("lm_head.weight", "lm_head.weight")] == ("transposed", "[96, 32] -> [32, 96]; content equal, transposed")
    for i in range(LAYERS):
        assert pairs[(f"model.layers.{i}.mlp.down_proj.weight", f"model.layers.{i}.mlp.wo_t.weight")] == (
            "transposed", "[32, 48] -> [48, 32]; paired by content, transposed")
    assert report.counts()["transposed"] == 1 + LAYERS and report.counts()["removed"] == report.counts()["added"] == 0
    # a tensor that has the swapped shape but not the transposed values is no transpose
    state = _state(llama)
    state["lm_head.weight"] = state["lm_head.weight"].reshape(32, 96).contiguous()
    save_file(state, tmp_path / "reshaped.safetensors")
    pairs = _pairs(_content(llama, tmp_path / "reshaped.safetensors"))
    assert pairs[("lm_head.weight", "lm_head.weight")][0] == "shape_changed"


def test_q_and_k_rows_permuted_by_llama_cpp_are_the_rotary_interleave(llama, tmp_path, llama_cpp) -> None:
    """What convert_hf_to_gguf.py does to Llama's q and k, with its names: the header pairs by names, the rows say how."""
    state = _state(llama)
    out = {}
    for key, value in state.items():
        if key.endswith("q_proj.weight"):
            value = llama_cpp.permute(value, HEADS, HEADS)
        elif key.endswith("k_proj.weight"):
            value = llama_cpp.permute(value, HEADS, KV_HEADS)
        out[llama_cpp.name(key)] = value.contiguous()
    save_file(out, tmp_path / "gguf_names.safetensors")
    report = _content(llama, tmp_path / "gguf_names.safetensors")
    rows = {(r["kind"], r["a"], r["b"], r["detail"]) for r in report.folded()}
    assert ("permuted", "model.layers.{0..3}.self_attn.q_proj.weight", "blk.{0..3}.attn_q.weight", "rows permuted: rotary interleave (heads=4)") in rows
    assert ("permuted", "model.layers.{0..3}.self_attn.k_proj.weight", "blk.{0..3}.attn_k.weight", "rows permuted: rotary interleave (heads=2)") in rows
    assert ("renamed", "model.layers.{0..3}.self_attn.v_proj.weight", "blk.{0..3}.attn_v.weight", "content equal") in rows
    assert report.counts()["permuted"] == 2 * LAYERS and report.counts()["renamed"] == 3 + 7 * LAYERS
    back = {(r["kind"], r["a"], r["detail"]) for r in _content(tmp_path / "gguf_names.safetensors", llama).folded()}
    assert ("permuted", "blk.{0..3}.attn_q.weight", "rows permuted: rotary interleave reversed (heads=4)") in back
    # the command: text folded, and JSON
    done = run_cli(["diff", str(llama), str(tmp_path / "gguf_names.safetensors"), "--content"])
    assert done.returncode == 0, done.stderr
    assert ("  permuted      model.layers.{0..3}.self_attn.k_proj.weight -> blk.{0..3}.attn_k.weight  "
            "(rows permuted: rotary interleave (heads=2))") in done.stdout.splitlines()
    data = json.loads(run_cli(["diff", str(llama), str(tmp_path / "gguf_names.safetensors"), "--content", "--json"]).stdout)
    assert data["counts"]["permuted"] == 2 * LAYERS


def test_the_permutation_helpers_agree_with_llama_cpp(llama_cpp) -> None:
    w = torch.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        assert llama_cpp.permute(w, heads, heads)[:, 0].tolist() == [3 * i for i in rotary_permutation(24, heads)]
    rows = [bytes([i]) * 8 for i in range(6)]
    swapped = [rows[1], rows[0], *rows[2:]]
    assert describe_permutation(b"".join(rows), b"".join(swapped)) == "rows permuted: 2 of 6 rows moved (0<-1, 1<-0)"
    assert describe_permutation(b"".join(rows), b"".join(rows)) is None


def test_changed_values_are_measured_and_joins_confirmed(llama, tmp_path) -> None:
    state = _state(llama)
    torch.manual_seed(1)
    q = "model.layers.1.self_attn.q_proj.weight"
    noise = torch.randn_like(state[q]) * 1e-3
    state[q] = state[q] + noise
    state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16)
    state["model.norm.weight"] = state["model.norm.weight"].half()  # ones: the cast loses nothing
    for i in range(LAYERS):
        parts = [state.pop(f"model.layers.{i}.self_attn.{x}_proj.weight") for x in "qkv"]
        state[f"model.layers.{i}.self_attn.qkv.weight"] = torch.cat(parts)
    save_file(state, tmp_path / "changed.safetensors")
    report = _content(llama, tmp_path / "changed.safetensors")
    (cast,) = [c for c in report.changes if c.a == ("model.layers.2.mlp.up_proj.weight",)]
    assert cast.values is not None and 0 < cast.values[0] < 1e-2 and cast.values[1] > 0.9999
    assert "  dtype_changed model.norm.weight -> model.norm.weight  (float32 -> float16; values equal)" in report.render().splitlines()
    merged = [c for c in report.changes if c.kind == "merged"]
    assert len(merged) == LAYERS
    notes = {c.b[0]: c.detail.rsplit("; ", 1)[1] for c in merged}
    assert notes == {f"model.layers.{i}.self_attn.qkv.weight": "content differs" if i == 1 else "content equal, in the order q_proj, k_proj, v_proj"
                     for i in range(LAYERS)}  # layer 1's q has the noise
    # same name and shape, other values: largest difference and cosine
    state = _state(llama)
    state[q] = state[q] + noise
    save_file(state, tmp_path / "noisy.safetensors")
    report = _content(llama, tmp_path / "noisy.safetensors")
    (changed,) = [c for c in report.changes if c.kind == "values_changed"]
    assert changed.a == (q,) and changed.values[0] == pytest.approx(noise.abs().max().item(), rel=1e-5)
    original = _state(llama)[q].double().flatten()
    edited = original + noise.double().flatten()
    assert changed.values[1] == pytest.approx(float(original @ edited / original.norm() / edited.norm()), abs=1e-7)
    assert report.counts()["unchanged"] == 2 + 9 * LAYERS
    text = report.render()
    assert f"  values_changed {q} -> {q}  (values differ: max abs diff " in text


def test_joins_along_other_dims_are_confirmed_with_their_order(llama, tmp_path) -> None:
    """up and gate side by side (dim 1, up first), and down split in three along dim 1: the values name the order;
    a join whose values are not its parts' (layer 2's up changed) is refuted."""
    state = _state(llama)
    for i in range(LAYERS):
        gate, up = (state.pop(f"model.layers.{i}.mlp.{x}_proj.weight") for x in ("gate", "up"))
        state[f"model.layers.{i}.mlp.fused.weight"] = torch.cat([up if i != 2 else up + 1, gate], dim=1)
        a, b, c = state.pop(f"model.layers.{i}.mlp.down_proj.weight").split([8, 16, 24], dim=1)
        state.update({f"model.layers.{i}.mlp.down_a.weight": a, f"model.layers.{i}.mlp.down_b.weight": b,
                      f"model.layers.{i}.mlp.down_c.weight": c})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "b.safetensors")
    report = _content(llama, tmp_path / "b.safetensors")
    notes = {(c.kind, c.a[0] if c.kind == "split" else c.b[0]): c.detail.rsplit("; ", 1)[1] for c in report.changes if c.kind in ("merged", "split")}
    for i in range(LAYERS):
        assert notes[("merged", f"model.layers.{i}.mlp.fused.weight")] == (
            "content differs" if i == 2 else "content equal, in the order up_proj, gate_proj")
        assert notes[("split", f"model.layers.{i}.mlp.down_proj.weight")] == "content equal, in the order down_a, down_b, down_c"


def test_the_html_page_holds_the_counts_and_every_pattern_escaped(llama, tmp_path) -> None:
    state = _state(llama)
    state["model.layers.0.mlp.<b>odd</b>.weight"] = state.pop("model.layers.0.mlp.up_proj.weight")
    state["model.norm.weight"] = state["model.norm.weight"].half()
    save_file(state, tmp_path / "edited.safetensors")
    page = tmp_path / "diff.html"
    done = run_cli(["diff", str(llama), str(tmp_path / "edited.safetensors"), "--html", str(page)])
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html  # nothing fetched
    assert '<tr class="dtype_changed"><td>dtype changed</td><td class="key">model.norm.weight</td>' in html
    assert "model.layers.0.mlp.&lt;b&gt;odd&lt;/b&gt;.weight" in html and "<b>odd</b>" not in html
    assert '<tr class="unchanged"><td>unchanged</td><td class="num">' + str(2 + 9 * LAYERS - 1) + "</td></tr>" in html
    assert "tr.renamed td { background: #d6e8fa; }" in html
    assert set(COLOURS) == set(KINDS)  # every kind has its colour


def test_content_reads_safetensors_without_torch_and_is_deterministic(llama, tmp_path, llama_cpp) -> None:
    state = _state(llama)
    state["lm_head.weight"] = state["lm_head.weight"].t().contiguous()
    state["model.layers.0.self_attn.q_proj.weight"] = llama_cpp.permute(state["model.layers.0.self_attn.q_proj.weight"], HEADS, HEADS)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"] * 2
    state["empty.weight"] = torch.zeros(0, 3)
    save_file(state, tmp_path / "edited.safetensors")
    code = "import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); from statebridge.cli import main; sys.exit(main())"
    outputs = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code, "diff", str(llama), str(tmp_path / "edited.safetensors"), "--content", "--json"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        body, torch_loaded = done.stdout.rsplit("\n", 2)[:2]
        assert torch_loaded == "False"
        outputs.add(body)
    assert len(outputs) == 1
    counts = json.loads(outputs.pop())["counts"]
    assert (counts["transposed"], counts["permuted"], counts["values_changed"], counts["added"]) == (1, 1, 1, 1)



@pytest.mark.slow
def test_content_of_large_tensors_is_read_a_chunk_at_a_time(tmp_path, llama_cpp) -> None:
    """176 MB a side: values compared, a transpose and a rotary interleave found, in a peak RSS far below the tensors."""
    torch.manual_seed(0)
    big, t, q = torch.randn(3000, 10000), torch.randn(2000, 5000), torch.randn(1024, 4096)
    save_file({"big": big, "t": t, "q": q}, tmp_path / "a.safetensors")
    big[2999, 9999] += 0.5
    save_file({"big": big, "t_renamed": t.t().contiguous(), "q": llama_cpp.permute(q, 8, 8).contiguous()}, tmp_path / "b.safetensors")
    del big, t, q
    done, peak = run_cli_peak(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--content"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "  permuted      q -> q  (rows permuted: rotary interleave (heads=8))" in lines
    assert "  transposed    t -> t_renamed  ([2000, 5000] -> [5000, 2000]; paired by content, transposed)" in lines
    assert any(line.startswith("  values_changed big -> big  (values differ: max abs diff 0.5, cosine 1 - ") for line in lines), done.stdout
    assert peak < 150 * 2**20, f"peak RSS {peak / 2**20:.0f} MB for 176 MB tensors"


def test_values_moved_onto_another_name_are_followed_and_nothing_is_paired_twice(llama, tmp_path) -> None:
    """B's o_proj holds A's q_proj (its own o_proj gone), and A's q_proj name is dropped: the names say "unchanged o,
    removed q", the values say "q renamed to o, o removed"; B's o is explained once."""
    state = _state(llama)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    state[o] = state.pop(q)
    save_file(state, tmp_path / "moved_values.safetensors")
    report = _content(llama, tmp_path / "moved_values.safetensors")  # asserts every key once
    pairs = _pairs(report)
    assert pairs[(q, o)] == ("renamed", "paired by content")
    assert [c.a for c in report.changes if c.kind == "removed"] == [(o,)]
    assert report.counts()["values_changed"] == 0


def test_content_across_formats_a_gguf_written_by_the_core_and_a_torch_pickle(llama, tmp_path, llama_cpp) -> None:
    """The bytes hashed are the elements row-major whatever the format: a GGUF (llama.cpp names) and a .pt confirm every pairing."""
    gguf = tmp_path / "llama.gguf"
    sb.run(llama, [{"rename": {"pattern": p, "to": t}} for p, t in llama_cpp.renames.items()], gguf, progress=False)
    report = _content(llama, gguf)
    assert report.counts()["renamed"] == 3 + 9 * LAYERS
    assert all(c.detail.endswith("content equal") for c in report.changes)
    state = _state(llama)
    state["model.norm.weight"] = state["model.norm.weight"] * 3
    torch.save(state, tmp_path / "llama.pt")
    report = _content(llama, tmp_path / "llama.pt")
    assert report.counts()["unchanged"] == 2 + 9 * LAYERS and report.counts()["values_changed"] == 1
    (changed,) = [c for c in report.changes if c.kind == "values_changed"]
    assert changed.values == (2.0, 1.0)  # norms of ones, tripled
