"""Did you mean: the analysis plugin's answer to the core's ``suggest_keys`` hook, in a strict load and a ``require`` check."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaForCausalLM

import statebridge as sb
from statebridge.plugins import reset_plugins
from statebridge.testing import run_cli
from statebridge_analysis.suggest import nearest

#: what a load of llama.cpp's names into the Hugging Face model is told, first (layer 0, A's storage order)
SUGGESTED = ("did you mean: 'blk.0.attn_k.weight' -> 'model.layers.0.self_attn.k_proj.weight'; "
             "'blk.0.attn_norm.weight' -> 'model.layers.0.input_layernorm.weight'; "
             "'blk.0.attn_output.weight' -> 'model.layers.0.self_attn.o_proj.weight'; "
             "'blk.0.attn_q.weight' -> 'model.layers.0.self_attn.q_proj.weight'; "
             "'blk.0.attn_v.weight' -> 'model.layers.0.self_attn.v_proj.weight' (and 22 more)?")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("suggest") / "llama"
    tiny_llama(folder, layers=3)
    return folder


@pytest.fixture(scope="module")
def gguf_named(llama, llama_cpp) -> Path:
    """The Llama's state under llama.cpp's names, but for the embedding, the final norm and the head."""
    path = llama.parent / "gguf-names.safetensors"
    state = load_file(llama / "model.safetensors")
    save_file({llama_cpp.name(k) if ".layers." in k else k: v for k, v in state.items()}, path)
    return path


def test_a_strict_load_into_a_transformers_model_suggests_its_keys(llama, gguf_named, monkeypatch) -> None:
    model = LlamaForCausalLM(AutoConfig.from_pretrained(llama))
    with pytest.raises(sb.PlanError) as told:
        sb.load_into(model, gguf_named)
    assert str(told.value).endswith("; " + SUGGESTED)
    monkeypatch.setenv("STATEBRIDGE_DISABLE_PLUGINS", "analysis")
    reset_plugins()
    try:
        with pytest.raises(sb.PlanError) as plain:
            sb.load_into(model, gguf_named)
    finally:
        monkeypatch.delenv("STATEBRIDGE_DISABLE_PLUGINS")
        reset_plugins()
    assert str(plain.value) + "; " + SUGGESTED == str(told.value)  # without the plugin: the same error, no suggestion


def test_a_run_required_to_make_every_key_of_a_checkpoint_suggests_them(llama, gguf_named, tmp_path) -> None:
    (tmp_path / "nothing.yaml").write_text("steps: []\n")
    args = ["run", str(tmp_path / "nothing.yaml"), "--source", str(gguf_named), "--target", str(tmp_path / "out.safetensors"), "--no-progress",
            "--expect", str(llama / "model.safetensors"), "--require", "no_missing"]
    done = run_cli(args)
    assert done.returncode == 2 and SUGGESTED in done.stderr, done.stderr
    plain = run_cli(args, env={"STATEBRIDGE_DISABLE_PLUGINS": "analysis"})
    assert plain.returncode == 2 and "did you mean" not in plain.stderr
    assert plain.stderr.strip() == done.stderr.strip().replace("; " + SUGGESTED, "")


def test_shapes_decide_between_names_alike_and_typos_are_near() -> None:
    meta = sb.TensorMeta
    candidates = {"enc.0.a.weight": meta((8, 4), "float32"), "enc.0.b.weight": meta((16, 4), "float32"),
                  "enc.1.a.weight": meta((8, 4), "float32"), "enc.1.b.weight": meta((16, 4), "float32"),
                  "head.weight": meta((3, 4), "float32")}
    found = nearest({"enc.1.c.weight": meta((16, 4), "float32"), "haed.weight": meta((3, 4), "float32"),
                     "unrelated.bias": meta((2,), "float32")}, candidates)
    assert found == {"enc.1.c.weight": ["enc.1.b.weight"], "haed.weight": ["head.weight"]}
    # names alone (a key list): both letters are alike, the same layer's come first
    assert nearest({"enc.1.c.weight": None}, dict.fromkeys(candidates)) == {"enc.1.c.weight": ["enc.1.a.weight", "enc.1.b.weight"]}
