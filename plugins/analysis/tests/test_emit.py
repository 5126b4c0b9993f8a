"""``diff --emit-rules``: the emitted config, run by ``statebridge run``, reproduces B's tensors bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.testing import run_cli

LAYERS = 3


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("emit") / "llama"
    tiny_llama(folder, layers=LAYERS, vocab=64, seed=1)
    return folder


def _emit_run_compare(a: Path, b: Path, tmp_path: Path, *flags: str) -> str:
    """Emit rules from A to B, run them on A, and check every tensor of the result equals B's, bit for bit."""
    rules = tmp_path / "rules.yaml"
    done = run_cli(["diff", str(a), str(b), "--emit-rules", str(rules), *flags])
    assert done.returncode == 0, done.stderr
    assert "planned against A, they give B's names, shapes and dtypes" in done.stderr, done.stderr
    out = tmp_path / "out.safetensors"
    done = run_cli(["run", str(rules), "--source", str(a), "--target", str(out), "--no-progress"])
    assert done.returncode == 0, done.stderr
    with sb.open_source(out) as made, sb.open_source(b) as wanted:
        assert set(made.metas()) == set(wanted.metas())
        for key in wanted.metas():
            x, y = made.load(key), wanted.load(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), key
    return rules.read_text()


def test_fused_split_and_prefix_dropped(llama, tmp_path) -> None:
    b = tmp_path / "b.safetensors"
    sb.run(llama, [
        {"concat": {"inputs": [f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"], "output": "model.layers.*.self_attn.qkv_proj.weight"}},
        {"split": {"input": "model.layers.*.mlp.down_proj.weight", "outputs": ["model.layers.*.mlp.down.a", "model.layers.*.mlp.down.b"], "dim": 1}},
        {"rename": {"pattern": "model.**", "to": "**"}},
    ], b, progress=False)
    rules = _emit_run_compare(llama, b, tmp_path)
    # q, k, v are stored k, q, v (alphabetically): the first layer's values put them back in order
    assert "inputs: [model.layers.*.self_attn.q_proj.weight, model.layers.*.self_attn.k_proj.weight, model.layers.*.self_attn.v_proj.weight]" in rules
    assert "pattern: model.layers.*.mlp.gate_proj.weight, to: layers.*.mlp.gate_proj.weight" in rules


def test_gguf_names_casts_and_a_drop(llama, tmp_path) -> None:
    b = tmp_path / "b.safetensors"
    sb.run(llama, [
        {"drop": {"keys": ["model.layers.*.post_attention_layernorm.weight"]}},
        {"rename": {"pattern": "model.layers.*.self_attn.q_proj.weight", "to": "blk.*.attn_q.weight"}},
        {"rename": {"pattern": "model.layers.*.self_attn.o_proj.weight", "to": "blk.*.attn_output.weight"}},
        {"rename": {"pattern": "model.embed_tokens.weight", "to": "token_embd.weight"}},
        {"rename": {"pattern": "lm_head.weight", "to": "output.weight"}},
        {"cast": {"dtype": "bf16", "pattern": "blk.*.attn_*.weight"}},
    ], b, progress=False)
    rules = _emit_run_compare(llama, b, tmp_path)
    assert "- drop:\n    keys: [model.layers.*.post_attention_layernorm.weight]" in rules
    assert "cast: {pattern: blk.*.attn_q.weight, dtype: bfloat16}" in rules


def test_shifted_layers_become_a_mapping(llama, tmp_path) -> None:
    keys = list(sb.open_source(llama).metas())
    mapping = {k: k.replace(f"layers.{i}.", f"layers.{i + 1}.") for k in keys for i in range(LAYERS) if f"layers.{i}." in k}
    b = tmp_path / "b.safetensors"
    sb.run(llama, [{"rename": {"mapping": mapping}}], b, progress=False)
    rules = _emit_run_compare(llama, b, tmp_path)
    assert "model.layers.0.mlp.up_proj.weight: model.layers.1.mlp.up_proj.weight" in rules


def test_what_b_alone_has_is_reported_not_invented(llama, tmp_path) -> None:
    state = load_file(llama / "model.safetensors")
    state["extra.bias"] = torch.ones(3)
    save_file(state, tmp_path / "b.safetensors")
    rules = tmp_path / "rules.yaml"
    done = run_cli(["diff", str(llama), str(tmp_path / "b.safetensors"), "--emit-rules", str(rules)])
    assert done.returncode == 0
    assert "statebridge: warning: rules in " in done.stderr and "extra.bias: only in B" in done.stderr
    assert "# NOTE: extra.bias: only in B; no rule can make it from A" in rules.read_text()


def test_a_family_cast_in_one_layer_only_is_renamed_once_and_cast_by_key(llama, tmp_path) -> None:
    b = tmp_path / "b.safetensors"
    sb.run(llama, [
        {"rename": {"pattern": "model.layers.*.mlp.up_proj.weight", "to": "blk.*.ffn_up.weight"}},
        {"cast": {"dtype": "fp16", "pattern": "blk.1.ffn_up.weight"}},
    ], b, progress=False)
    rules = _emit_run_compare(llama, b, tmp_path)
    assert rules.count("to: blk.*.ffn_up.weight") == 1
    assert "cast: {pattern: blk.1.ffn_up.weight, dtype: float16}" in rules


def test_a_gguf_quantized_and_cast_by_the_core_is_reproduced_block_for_block(llama, tmp_path) -> None:
    b = tmp_path / "b.gguf"
    sb.run(llama, [
        {"rename": {"pattern": "model.layers.*.mlp.gate_proj.weight", "to": "blk.*.ffn_gate.weight"}},
        {"quantize": {"blk.*.ffn_gate.weight": "Q8_0", "model.layers.*.mlp.up_proj.weight": "Q8_0"}},
        {"cast": {"dtype": "fp16", "pattern": "model.layers.*.self_attn.*.weight"}},
    ], b, progress=False)
    diff = run_cli(["diff", str(llama), str(b), "--json"])
    details = {(c["kind"], c["detail"]) for c in json.loads(diff.stdout)["changes"]}
    assert ("dtype_changed", "float32 -> float32 (stored Q8_0)") in details and ("renamed", "float32 -> float32 (stored Q8_0)") in details
    assert ("dtype_changed", "float32 -> float16") in details
    rules = tmp_path / "rules.yaml"
    done = run_cli(["diff", str(llama), str(b), "--emit-rules", str(rules)])
    assert "planned against A, they give B's names, shapes and dtypes" in done.stderr, done.stderr
    assert "quantize: {blk.*.ffn_gate.weight: Q8_0, model.layers.*.mlp.up_proj.weight: Q8_0}" in rules.read_text()
    out = tmp_path / "out.gguf"
    done = run_cli(["run", str(rules), "--source", str(llama), "--target", str(out), "--no-progress"])
    assert done.returncode == 0, done.stderr
    with sb.open_source(out) as made, sb.open_source(b) as wanted:
        assert made.metas() == wanted.metas()
        for key, meta in wanted.metas().items():
            x, y = made.stored_span(key), wanted.stored_span(key)
            with open(x.path, "rb") as fx, open(y.path, "rb") as fy:
                fx.seek(x.offset)
                fy.seek(y.offset)
                assert fx.read(x.length) == fy.read(y.length), key  # the stored bytes: blocks for Q8_0


def test_a_transposed_head_and_a_dropped_layer_norm(llama, tmp_path) -> None:
    b = tmp_path / "b.safetensors"
    sb.run(llama, [
        {"transpose": {"pattern": "lm_head.weight"}},
        {"drop": {"keys": ["model.layers.1.input_layernorm.weight"]}},
    ], b, progress=False)
    rules = _emit_run_compare(llama, b, tmp_path)
    assert "- transpose: {pattern: lm_head.weight}" in rules
    assert "keys: [model.layers.1.input_layernorm.weight]" in rules  # one layer's: named, not globbed


def test_content_rules_rename_by_values_transpose_a_square_weight_apply_the_rotary_interleave_and_fuse_on_dim_1(
    llama, tmp_path, llama_cpp
) -> None:
    """What only --content can tell, as rules: opaque renames, a transposed square o_proj (its shape does not change),
    q and k through llama.cpp's rotary interleave, one layer's v rows reversed, and gate and up fused along dim 1."""
    state = load_file(llama / "model.safetensors")
    b_state: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("q_proj.weight"):
            value = llama_cpp.permute(value, 4, 4)
        elif key.endswith("k_proj.weight"):
            value = llama_cpp.permute(value, 4, 2)
        elif key.endswith("o_proj.weight"):
            value = value.t()
        elif key == "model.layers.1.self_attn.v_proj.weight":
            value = value.flip(0)
        elif key.endswith(("gate_proj.weight", "up_proj.weight")):
            continue
        b_state[{"model.embed_tokens.weight": "w.b", "lm_head.weight": "w.a"}.get(key) or llama_cpp.name(key)] = value.contiguous()
    for i in range(LAYERS):
        gate, up = (state[f"model.layers.{i}.mlp.{x}_proj.weight"] for x in ("gate", "up"))
        b_state[f"blk.{i}.ffn_gate_up.weight"] = torch.cat([gate, up], dim=1)
    b = tmp_path / "b.safetensors"
    save_file(b_state, b)
    rules = _emit_run_compare(llama, b, tmp_path, "--content")
    for rule in ("- transpose: {pattern: blk.*.attn_output.weight}",
                 "- permute_rows: {pattern: blk.*.attn_q.weight, rotary_heads: 4}",
                 "- permute_rows: {pattern: blk.*.attn_k.weight, rotary_heads: 2}",
                 "- permute_rows:\n    pattern: blk.1.attn_v.weight\n    order: [15, 14,",
                 "inputs: [model.layers.*.mlp.gate_proj.weight, model.layers.*.mlp.up_proj.weight]\n        output: blk.*.ffn_gate_up.weight\n        dim: 1",
                 "rename: {pattern: model.embed_tokens.weight, to: w.b}", "rename: {pattern: lm_head.weight, to: w.a}"):
        assert rule in rules, rule
    # every step is undone by --inverse (which reads the original layout from the config's source): A back bit for bit
    (tmp_path / "with-source.yaml").write_text(f"source: {llama}\n{rules}")
    back = tmp_path / "back.safetensors"
    done = run_cli(["run", str(tmp_path / "with-source.yaml"), "--inverse", "--source", str(tmp_path / "out.safetensors"),
                    "--target", str(back), "--no-progress"])
    assert done.returncode == 0, done.stderr
    again = load_file(back)
    assert set(again) == set(state) and all(torch.equal(again[k], v) for k, v in state.items())
    # without --content the header-only rules cannot say any of it
    header_only = tmp_path / "header.yaml"
    done = run_cli(["diff", str(llama), str(b), "--emit-rules", str(header_only)])
    assert "permute_rows" not in header_only.read_text() and "transpose" not in header_only.read_text()


def test_a_gguf_written_by_the_core_with_llama_cpp_names_and_the_rotary_interleave(llama, tmp_path, llama_cpp) -> None:
    """What convert_hf_to_gguf.py makes of a Llama (its names, q and k interleaved), written as GGUF by the core:
    --content --emit-rules, run into a .gguf, gives B's tensors bit for bit."""
    state = load_file(llama / "model.safetensors")
    permuted = {}
    for key, value in state.items():
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            value = llama_cpp.permute(value, 4, 4 if "q_proj" in key else 2)
        permuted[llama_cpp.name(key)] = value.contiguous()
    save_file(permuted, tmp_path / "permuted.safetensors")
    b = tmp_path / "b.gguf"
    sb.run(tmp_path / "permuted.safetensors", [], b, progress=False)
    rules = _emit_run_compare(llama, b, tmp_path, "--content")
    assert "- permute_rows: {pattern: blk.*.attn_q.weight, rotary_heads: 4}" in rules
    # and back: the GGUF to the Hugging Face layout, the interleave undone
    (tmp_path / "back").mkdir()
    rules = _emit_run_compare(b, llama, tmp_path / "back", "--content")
    assert "- permute_rows: {pattern: model.layers.*.self_attn.k_proj.weight, rotary_heads: 2, reverse: true}" in rules


def test_permute_rows_refuses_what_it_cannot_do_in_one_line(llama, tmp_path) -> None:
    for params, message in (({"pattern": "lm_head.weight"}, "give either order or rotary_heads"),
                            ({"pattern": "lm_head.weight", "order": [0, 0]}, "is not a permutation"),
                            ({"pattern": "lm_head.weight", "order": [1, 0]}, "order has 2 rows, 'lm_head.weight'"),
                            ({"pattern": "model.norm.weight", "rotary_heads": 5}, "not a multiple of 2 x 5 heads")):
        (tmp_path / "c.yaml").write_text(json.dumps({"steps": [{"permute_rows": params}]}))
        done = run_cli(["plan", str(tmp_path / "c.yaml"), "--source", str(llama)])
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_values_no_rule_makes_are_noted_not_invented(llama, tmp_path) -> None:
    """--content finds layer 1's renamed up_proj changed: the rules rename it and say they carry A's values."""
    b = tmp_path / "b.safetensors"
    sb.run(llama, [{"rename": {"pattern": "model.layers.*.mlp.up_proj.weight", "to": "blk.*.ffn_up.weight"}}], b, progress=False)
    state = load_file(b)
    state["blk.1.ffn_up.weight"] = state["blk.1.ffn_up.weight"] * 2
    save_file(state, b)
    rules = tmp_path / "rules.yaml"
    done = run_cli(["diff", str(llama), str(b), "--content", "--emit-rules", str(rules)])
    assert done.returncode == 0, done.stderr
    text = rules.read_text()
    assert "rename: {pattern: model.layers.*.mlp.up_proj.weight, to: blk.*.ffn_up.weight}" in text
    assert "# NOTE: blk.1.ffn_up.weight: B's values differ from A's (values differ: max abs diff " in text
    assert "the rules carry A's values" in text and text.count("# NOTE:") == 1
