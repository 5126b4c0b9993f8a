"""``statebridge automap SRC --target T``: candidate rules to a checkpoint, a key list or a model, reviewed then run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaForCausalLM

import statebridge as sb
from statebridge.testing import run_cli

LAYERS = 3


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("automap") / "llama"
    tiny_llama(folder, layers=LAYERS, seed=2)
    return folder


@pytest.fixture(scope="module")
def gguf_named(llama, tmp_path_factory, llama_cpp) -> Path:
    """The Llama's state under llama.cpp's names (blk.N.attn_q.weight, ...), values unchanged."""
    path = tmp_path_factory.mktemp("automap") / "gguf-names.safetensors"
    save_file({llama_cpp.name(k): v for k, v in load_file(llama / "model.safetensors").items()}, path)
    return path


def _automap(source: Path, target: str, rules: Path, *extra: str, cwd: Path | None = None) -> str:
    done = run_cli(["automap", str(source), "--target", target, "--emit-rules", str(rules), *extra], cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _loads_strictly(llama: Path, checkpoint: Path) -> None:
    """The checkpoint loads into the model of the config with load_state_dict(strict=True), every value the original's."""
    model = LlamaForCausalLM(AutoConfig.from_pretrained(llama))
    model.load_state_dict(load_file(checkpoint), strict=True)
    original = load_file(llama / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(original)
    for key, value in original.items():
        assert torch.equal(state[key], value), key


def test_gguf_names_automapped_to_a_model_config_load_strictly(llama, gguf_named, tmp_path) -> None:
    """The issue's case: a state with GGUF names, the model folder's config.json built on the meta device."""
    rules = tmp_path / "rules.yaml"
    out = _automap(gguf_named, str(llama / "config.json"), rules)
    assert "target: LlamaForCausalLM from" in out and "(compared: names, shapes)" in out
    assert "renamed       blk.{0..2}.attn_q.weight -> model.layers.{0..2}.self_attn.q_proj.weight  (score 1.00)" in out
    assert f"coverage: {3 + 9 * LAYERS} of {3 + 9 * LAYERS} source keys (100%), {3 + 9 * LAYERS} of {3 + 9 * LAYERS} target keys (100%)" in out
    text = rules.read_text()
    assert "rename: {pattern: blk.*.attn_q.weight, to: model.layers.*.self_attn.q_proj.weight}" in text
    made = tmp_path / "out.safetensors"
    done = run_cli(["run", str(rules), "--source", str(gguf_named), "--target", str(made), "--no-progress"])
    assert done.returncode == 0, done.stderr
    _loads_strictly(llama, made)


def test_a_fused_target_is_a_merge_its_parts_ordered_by_the_names(llama, tmp_path) -> None:
    """A module:factory target that fuses q, k, v and gate, up (Phi-3's layout): concat rules, in the order the names give."""
    (tmp_path / "fused_model.py").write_text(
        "import torch\n"
        "class Layer(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.self_attn = torch.nn.Module()\n"
        "        self.self_attn.qkv_proj = torch.nn.Linear(32, 64, bias=False)\n"
        "        self.self_attn.o_proj = torch.nn.Linear(32, 32, bias=False)\n"
        "        self.mlp = torch.nn.Module()\n"
        "        self.mlp.gate_up_proj = torch.nn.Linear(32, 96, bias=False)\n"
        "        self.mlp.down_proj = torch.nn.Linear(48, 32, bias=False)\n"
        "def build():\n"
        "    with torch.device('meta'):\n"
        f"        return torch.nn.ModuleDict({{'layers': torch.nn.ModuleList(Layer() for _ in range({LAYERS}))}})\n"
    )
    source = tmp_path / "src.safetensors"
    state = load_file(llama / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items() if ".layers." in k and "layernorm" not in k}, source)
    rules = tmp_path / "rules.yaml"
    out = _automap(source, "fused_model:build", rules, cwd=tmp_path)
    assert "merged        layers.{0..2}.mlp.gate_proj.weight + layers.{0..2}.mlp.up_proj.weight -> layers.{0..2}.mlp.gate_up_proj.weight" in out
    text = rules.read_text()
    assert "inputs: [layers.*.self_attn.q_proj.weight, layers.*.self_attn.k_proj.weight, layers.*.self_attn.v_proj.weight]" in text
    assert "# NOTE: layers.0.self_attn.qkv_proj.weight: the order of its parts" in text
    made = tmp_path / "out.safetensors"
    assert run_cli(["run", str(rules), "--source", str(source), "--target", str(made), "--no-progress"]).returncode == 0
    fused = load_file(made)
    for i in range(LAYERS):
        q, k, v = (state[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv")
        assert torch.equal(fused[f"layers.{i}.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        assert torch.equal(fused[f"layers.{i}.mlp.gate_up_proj.weight"],
                           torch.cat([state[f"model.layers.{i}.mlp.gate_proj.weight"], state[f"model.layers.{i}.mlp.up_proj.weight"]]))


def test_a_key_list_of_names_alone_and_what_is_left_over(llama, gguf_named, tmp_path) -> None:
    """Names only: renames by name similarity; a source key nothing wants is dropped, a wanted key nothing makes is named."""
    keys = [k for k in sb.open_source(llama).metas() if k != "model.norm.weight"] + ["model.extra.bias"]
    listing = tmp_path / "keys.txt"
    listing.write_text("# wanted keys\n" + "\n".join(keys) + "\n")
    rules = tmp_path / "rules.yaml"
    out = _automap(gguf_named, str(listing), rules, "--json")
    data = json.loads(out)
    assert data["compared"] == ["name"]
    cover = data["coverage"]
    assert (cover["source_matched"], cover["source_keys"], cover["target_matched"], cover["target_keys"]) == (
        2 + 9 * LAYERS, 3 + 9 * LAYERS, 2 + 9 * LAYERS, 3 + 9 * LAYERS)
    assert cover["source_unmatched"] == ["output_norm.weight"] and cover["target_unmatched"] == ["model.extra.bias"]
    text = rules.read_text()
    assert "- drop:\n    keys: [output_norm.weight]" in text and "# NOTE: model.extra.bias: only in B" in text
    done = run_cli(["automap", str(gguf_named), "--target", str(listing)])
    assert "source keys no rule uses (the rules drop them):\n  output_norm.weight" in done.stdout
    assert "target keys no rule makes:\n  model.extra.bias" in done.stdout


def test_a_key_list_with_shapes_and_dtypes_is_matched_like_a_checkpoint(llama, gguf_named, tmp_path) -> None:
    """key<TAB>shape<TAB>dtype: shapes tell q from k and v, dtypes become casts."""
    with sb.open_source(llama) as source:
        lines = [f"{k}\t{list(m.shape)}\tbf16" for k, m in source.metas().items()]
    listing = tmp_path / "keys.tsv"
    listing.write_text("\n".join(lines) + "\n")
    rules = tmp_path / "rules.yaml"
    out = _automap(gguf_named, str(listing), rules)
    assert "(compared: names, shapes, dtypes)" in out
    assert "cast: {pattern: model.layers.*.self_attn.q_proj.weight, dtype: bfloat16}" in rules.read_text()
    made = tmp_path / "out.safetensors"
    assert run_cli(["run", str(rules), "--source", str(gguf_named), "--target", str(made), "--no-progress"]).returncode == 0
    with sb.open_source(made) as result:
        assert {k: (list(m.shape), m.dtype.name) for k, m in result.metas().items()} == {
            line.split("\t")[0]: (json.loads(line.split("\t")[1]), "bfloat16") for line in lines}


def test_a_checkpoint_target_orders_a_merge_by_its_values(llama, tmp_path) -> None:
    """Against a checkpoint the parts' order is read from the first layer's values (k, q, v here), not from the names."""
    b = tmp_path / "b.safetensors"
    sb.run(llama, [{"concat": {"inputs": [f"model.layers.*.self_attn.{x}_proj.weight" for x in "kqv"],
                               "output": "model.layers.*.self_attn.qkv_proj.weight"}}], b, progress=False)
    rules = tmp_path / "rules.yaml"
    _automap(llama, str(b), rules)
    assert "inputs: [model.layers.*.self_attn.k_proj.weight, model.layers.*.self_attn.q_proj.weight" in rules.read_text()


@pytest.mark.parametrize("target, message", [
    ("nowhere_module_xyz:build", "cannot import it"),
    ("json:dumps", "calling it raised"),
    ("{bad}.txt", "is listed twice"),
])
def test_bad_targets_are_one_line(gguf_named, tmp_path, target, message) -> None:
    if target.startswith("{bad}"):
        target = str(tmp_path / "bad.txt")
        Path(target).write_text("a.weight\na.weight\n")
    done = run_cli(["automap", str(gguf_named), "--target", target])
    assert done.returncode == 2 and done.stderr.startswith("statebridge: error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr


def test_a_tied_head_is_filled_by_its_tie_not_missing(tmp_path, tiny_llama, llama_cpp) -> None:
    """A model that ties lm_head to the embedding: the checkpoint holds one of them; the tie fills the other."""
    folder = tmp_path / "tied"
    tiny_llama(folder, layers=2, tie=True)
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state  # transformers saves a tied tensor once
    source = tmp_path / "gguf-names.safetensors"
    save_file({llama_cpp.name(k): v for k, v in state.items()}, source)
    rules = tmp_path / "rules.yaml"
    done = run_cli(["automap", str(source), "--target", str(folder / "config.json"), "--emit-rules", str(rules)])
    assert done.returncode == 0, done.stderr
    assert "target keys a tie fills (loading gives them their partner's tensor):\n  lm_head.weight (tied to model.embed_tokens.weight)" in done.stdout
    assert "target keys no rule makes" not in done.stdout and "warning" not in done.stderr
    assert f"{3 + 9 * 2} of {3 + 9 * 2} target keys (100%)" in done.stdout
    assert "# NOTE: lm_head.weight: tied to model.embed_tokens.weight in B; loading fills it" in rules.read_text()
    made = tmp_path / "out.safetensors"
    assert run_cli(["run", str(rules), "--source", str(source), "--target", str(made), "--no-progress"]).returncode == 0
    model = LlamaForCausalLM(AutoConfig.from_pretrained(folder))
    sb.load_into(model, made)  # strict: the tie counts as present
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_automap_against_a_key_list_never_imports_torch(gguf_named, tmp_path) -> None:
    listing = tmp_path / "keys.txt"
    listing.write_text("model.layers.0.self_attn.q_proj.weight\n")
    code = ("import sys\nfrom statebridge.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, "automap", str(gguf_named), "--target", str(listing),
                           "--emit-rules", str(tmp_path / "r.yaml")], capture_output=True, text=True)
    assert done.stdout.strip().endswith("False"), done.stdout + done.stderr


def test_meta_llama_names_are_mapped_too(llama, tmp_path) -> None:
    """Meta's original Llama layout (tok_embeddings, attention.wq, feed_forward.w1/w2/w3, attention_norm) to the model."""
    meta_names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}

    def meta_name(key: str) -> str:
        if key in meta_names:
            return meta_names[key]
        for hf, meta in parts.items():
            key = key.replace(f".{hf}.", f".{meta}.")
        return key.removeprefix("model.")

    source = tmp_path / "consolidated.safetensors"
    save_file({meta_name(k): v for k, v in load_file(llama / "model.safetensors").items()}, source)
    rules = tmp_path / "rules.yaml"
    out = _automap(source, str(llama / "config.json"), rules)
    assert "renamed       layers.{0..2}.feed_forward.w1.weight -> model.layers.{0..2}.mlp.gate_proj.weight  (score 1.00)" in out
    assert f"coverage: {3 + 9 * LAYERS} of {3 + 9 * LAYERS} source keys (100%)" in out
    made = tmp_path / "out.safetensors"
    assert run_cli(["run", str(rules), "--source", str(source), "--target", str(made), "--no-progress"]).returncode == 0
    _loads_strictly(llama, made)


def test_what_nothing_matches_gets_a_did_you_mean(gguf_named, tmp_path, llama) -> None:
    """A source key whose name says nothing the matching trusts: left for a person, with the nearest target key."""
    keys = [k.replace("model.norm.weight", "model.outnorm.weight") for k in sb.open_source(llama).metas()]
    listing = tmp_path / "keys.txt"
    listing.write_text("\n".join(keys) + "\n")
    done = run_cli(["automap", str(gguf_named), "--target", str(listing), "--json"])
    data = json.loads(done.stdout)
    assert data["coverage"]["source_unmatched"] == ["output_norm.weight"]
    assert data["suggestions"] == {"output_norm.weight": ["model.outnorm.weight"]}
    text = run_cli(["automap", str(gguf_named), "--target", str(listing)]).stdout
    assert "did you mean (nearest target keys no rule makes, for a rule to write by hand):\n  output_norm.weight -> model.outnorm.weight" in text
