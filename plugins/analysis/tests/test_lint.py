"""``statebridge lint`` on real transformers checkpoints with planted faults, each named by key; manifests."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.testing import run_cli, run_cli_peak
from statebridge_analysis import scan
from statebridge_analysis.lint import lint
from statebridge_analysis.scan import Scanner

LAYERS = 3


#: the tiny Llama these tests lint (``tiny_llama(folder, **SHAPE, tie=...)``)
SHAPE = {"layers": LAYERS, "vocab": 64, "hidden": 16, "intermediate": 32, "heads": 2, "kv_heads": 1}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("lint") / "clean"
    tiny_llama(folder, **SHAPE, tie=False)
    return folder


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, clean) -> Path:
    """The clean model with one of each fault lint must find, planted with safetensors."""
    folder = tmp_path_factory.mktemp("lint") / "faulty"
    shutil.copytree(clean, folder)
    state = load_file(folder / "model.safetensors")
    up = state["model.layers.1.mlp.up_proj.weight"]
    up[3, 5] = float("nan")
    up[4, 0] = float("inf")
    state["model.layers.2.self_attn.o_proj.weight"] = state["model.layers.2.self_attn.q_proj.weight"].clone()
    del state["lm_head.weight"]  # the config does not tie it: a model loaded from this has a random head
    state["model.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)  # a non-persistent buffer
    state["model.layers.1.post_attention_layernorm.weight"] = torch.ones(15)  # its siblings have 16
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(16, 32)
    save_file(state, folder / "model.safetensors")
    return folder


def _findings(done: subprocess.CompletedProcess[str]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for f in json.loads(done.stdout)["findings"]:
        out.setdefault(f["check"], []).append(f["keys"])
    return out


def test_a_model_transformers_saved_has_no_findings(clean) -> None:
    done = run_cli(["lint", str(clean)])  # its own config.json is used: tied and untrained norms are fine
    assert done.returncode == 0, done.stderr
    assert "checked against LlamaForCausalLM" in done.stdout and done.stdout.rstrip().endswith("no findings")


def test_every_planted_fault_is_named_by_key(faulty) -> None:
    done = run_cli(["lint", str(faulty), "--json"])
    assert done.returncode == 1, done.stderr  # errors: NaN/Inf, missing, a shape the model does not take
    found = _findings(done)
    assert found.pop("nan_inf") == [["model.layers.1.mlp.up_proj.weight"]]
    assert found.pop("duplicate") == [["model.layers.2.self_attn.o_proj.weight", "model.layers.2.self_attn.q_proj.weight"]]  # storage order
    assert found.pop("missing") == [["lm_head.weight"]]
    assert found.pop("orphan") == [["model.rotary_emb.inv_freq"]]
    assert found.pop("sibling") == [["model.layers.1.post_attention_layernorm.weight"]]
    assert found.pop("model_shape") == [["model.layers.1.post_attention_layernorm.weight"]]
    assert found.pop("zero") == [["model.layers.0.mlp.down_proj.weight"]]
    assert found == {}
    (nan,) = [f for f in json.loads(done.stdout)["findings"] if f["check"] == "nan_inf"]
    assert nan["level"] == "error" and nan["message"] == "1 NaN and 1 Inf of 512 values, the first at flat index 53 (float32[32, 16])"


def test_text_output_names_keys_and_levels(faulty) -> None:
    done = run_cli(["lint", str(faulty)])
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert any(l.split()[:3] == ["error", "missing", "lm_head.weight:"] for l in lines), lines
    assert any(l.split()[:3] == ["warning", "orphan", "model.rotary_emb.inv_freq:"] for l in lines), lines
    assert lines[-1] == "3 errors, 4 warnings"


def test_without_a_model_only_the_checkpoint_itself_is_judged(faulty) -> None:
    done = run_cli(["lint", str(faulty / "model.safetensors"), "--json"])
    found = _findings(done)
    assert sorted(found) == ["duplicate", "nan_inf", "sibling", "zero"]
    assert done.returncode == 1  # the NaN


def test_tied_weights_that_differ_and_a_tied_head_left_out(tmp_path, tiny_llama) -> None:
    folder = tmp_path / "tied"
    model = tiny_llama(folder, **SHAPE, tie=True)
    assert run_cli(["lint", str(folder)]).returncode == 0  # transformers saved no lm_head: it is tied
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = model.lm_head.weight.detach() + 1
    save_file(state, folder / "model.safetensors")
    done = run_cli(["lint", str(folder), "--json"])
    assert done.returncode == 1
    assert _findings(done) == {"tied_differ": [["lm_head.weight", "model.embed_tokens.weight"]]}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, folder / "model.safetensors")
    done = run_cli(["lint", str(folder), "--json"])  # a tied pair saved twice is no duplicate
    assert done.returncode == 0 and _findings(done) == {}


def test_model_given_as_a_config_file_for_a_bare_checkpoint(faulty, tmp_path) -> None:
    done = run_cli(["lint", str(faulty / "model.safetensors"), "--model", str(faulty / "config.json"), "--json"])
    assert _findings(done)["missing"] == [["lm_head.weight"]]
    done = run_cli(["lint", str(faulty), "--no-model", "--json"])
    assert "missing" not in _findings(done)


def test_mixed_dtypes_name_the_rarer_ones(tmp_path) -> None:
    state = {f"layers.{i}.w": torch.randn(4, 4) for i in range(4)}
    state["layers.2.w"] = state["layers.2.w"].half()
    state["ids"] = torch.arange(3)  # integers are not a dtype mix
    save_file(state, tmp_path / "m.safetensors")
    done = run_cli(["lint", str(tmp_path / "m.safetensors"), "--json"])
    assert done.returncode == 0  # warnings only
    assert _findings(done) == {"mixed_dtypes": [["layers.2.w"]], "sibling": [["layers.2.w"]]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e5m2])
def test_nan_inf_and_signed_zero_are_read_from_bit_patterns(tmp_path, dtype) -> None:
    values = torch.tensor([1.0, -0.0, float("nan"), -float("inf"), float("inf"), 2.0], dtype=torch.float32).to(dtype)
    state = {"bad": values, "zeros": torch.tensor([0.0, -0.0, 0.0]).to(dtype), "ones": torch.ones(3, dtype=dtype)}
    save_file(state, tmp_path / "v.safetensors")
    source = sb.open_source(tmp_path / "v.safetensors")
    scans = {s.key: s for s in Scanner(source).scan_all()}
    assert (scans["bad"].nan, scans["bad"].inf, scans["bad"].first_bad, scans["bad"].zero) == (1, 2, 2, False)
    assert scans["zeros"].zero and not scans["zeros"].constant  # -0.0 and 0.0 differ in bits, both zero
    assert scans["ones"].constant and not scans["ones"].zero and scans["ones"].nan == 0


def test_float8_e4m3_has_nan_but_no_inf(tmp_path) -> None:
    values = torch.tensor([1.0, float("nan"), 448.0, -448.0]).to(torch.float8_e4m3fn)
    save_file({"x": values}, tmp_path / "f8.safetensors")
    (found,) = Scanner(sb.open_source(tmp_path / "f8.safetensors")).scan_all()
    assert (found.nan, found.inf, found.first_bad) == (1, 0, 1)  # 448, the largest value, is no Inf


def test_chunks_smaller_than_a_tensor_give_the_same_checksum_and_counts(tmp_path, monkeypatch) -> None:
    x = torch.randn(1000, dtype=torch.float32)
    x[777] = float("nan")
    save_file({"x": x}, tmp_path / "x.safetensors")
    monkeypatch.setattr(scan, "CHUNK", 64)  # 63 chunks for this tensor, bounded memory
    (found,) = Scanner(sb.open_source(tmp_path / "x.safetensors")).scan_all()
    assert found.sha256 == hashlib.sha256(x.numpy().tobytes()).hexdigest()
    assert (found.nan, found.first_bad) == (1, 777)


def test_a_torch_pickle_is_checked_through_its_reader(tmp_path) -> None:
    x = torch.randn(8, 8)
    x[1, 1] = float("nan")
    torch.save({"a": x, "b": x.clone()}, tmp_path / "m.pt")
    report, scans = lint(sb.open_source(tmp_path / "m.pt"))
    assert [(f.check, f.keys) for f in report.findings] == [("nan_inf", ("a",)), ("nan_inf", ("b",)), ("duplicate", ("a", "b"))]
    assert scans["a"].sha256 == hashlib.sha256(x.numpy().tobytes()).hexdigest()


def test_manifest_catches_one_flipped_byte(clean, tmp_path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(clean, folder)
    manifest = tmp_path / "manifest.json"
    done = run_cli(["lint", str(folder), "--write-manifest", str(manifest)])
    assert done.returncode == 0, done.stderr
    assert run_cli(["lint", str(folder), "--verify", str(manifest)]).returncode == 0
    key = "model.layers.2.mlp.gate_proj.weight"
    span = sb.open_source(folder).raw_span(key)
    with open(span.path, "r+b") as f:
        f.seek(span.offset + span.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))  # the lowest mantissa bit of one float32
    done = run_cli(["lint", str(folder), "--verify", str(manifest), "--json"])
    assert done.returncode == 1
    assert _findings(done) == {"checksum": [[key]]}


def test_manifest_names_keys_added_removed_or_reshaped(clean, tmp_path) -> None:
    manifest = tmp_path / "manifest.json"
    run_cli(["lint", str(clean), "--no-model", "--write-manifest", str(manifest)])
    state = load_file(clean / "model.safetensors")
    del state["model.norm.weight"]
    state["extra"] = torch.ones(2)
    state["lm_head.weight"] = state["lm_head.weight"].half()
    save_file(state, tmp_path / "changed.safetensors")
    done = run_cli(["lint", str(tmp_path / "changed.safetensors"), "--verify", str(manifest), "--json"])
    messages = {f["keys"][0]: f["message"] for f in json.loads(done.stdout)["findings"] if f["check"] == "checksum"}
    assert messages == {
        "extra": "not in the manifest",
        "model.norm.weight": "in the manifest but not in the checkpoint",
        "lm_head.weight": "is float16[64, 16]; the manifest has float32[64, 16]",
    }


def test_a_manifest_verifies_the_same_tensors_in_another_format(clean, tmp_path) -> None:
    """The checksum is of the elements' bytes, so a .pt of the same state verifies against a safetensors manifest."""
    manifest = tmp_path / "manifest.json"
    run_cli(["lint", str(clean / "model.safetensors"), "--write-manifest", str(manifest)])
    torch.save(load_file(clean / "model.safetensors"), tmp_path / "same.pt")
    done = run_cli(["lint", str(tmp_path / "same.pt"), "--verify", str(manifest)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_bad_input_is_one_line(tmp_path) -> None:
    (tmp_path / "not.json").write_text("{")
    (tmp_path / "bad").mkdir()  # transformers refuses it with a message of several lines
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}))
    save_file({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    for args in (["lint", str(tmp_path / "nothing")], ["lint", str(tmp_path / "a.safetensors"), "--verify", str(tmp_path / "not.json")],
                 ["lint", str(tmp_path / "a.safetensors"), "--model", str(tmp_path)],
                 ["lint", str(tmp_path / "a.safetensors"), "--model", str(tmp_path / "bad")]):
        done = run_cli(args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("statebridge: error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_linting_safetensors_without_a_model_never_imports_torch(faulty) -> None:
    code = "import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); from statebridge.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "lint", str(faulty / "model.safetensors")], capture_output=True, text=True)
    assert done.returncode == 1 and "nan_inf" in done.stdout
    assert done.stdout.splitlines()[-1] == "False"


def test_quantized_gguf_blocks_are_hashed_and_their_values_examined_without_torch(tmp_path) -> None:
    """Q8_0 tensors written by the core: the checksum covers the blocks; a NaN scale shows as 32 NaN values."""
    state = {"blk.0.ffn_down.weight": torch.randn(4, 64), "blk.0.ffn_up.weight": torch.randn(4, 64), "norm": torch.randn(64)}
    gguf = tmp_path / "q.gguf"
    sb.run(state, [{"quantize": {"blk.*.ffn_*.weight": "Q8_0"}}], gguf, progress=False)
    source = sb.open_source(gguf)
    assert source.metas()["blk.0.ffn_up.weight"].stored == "Q8_0"
    manifest = tmp_path / "m.json"
    done = run_cli(["lint", str(gguf), "--write-manifest", str(manifest)])
    assert done.returncode == 0 and done.stdout.splitlines()[-2] == "no findings", done.stdout + done.stderr
    span = source.stored_span("blk.0.ffn_up.weight")
    assert span.length == 4 * 64 // 32 * 34  # Q8_0: a float16 scale and 32 int8 per block
    source.close()
    with open(span.path, "r+b") as f:
        f.seek(span.offset + 34)  # the second block's scale
        f.write(b"\x00\x7e")  # float16 NaN
    code = "import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); from statebridge.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "lint", str(gguf), "--verify", str(manifest)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "False"  # torch was never imported
    assert any(l.split()[:3] == ["error", "checksum", "blk.0.ffn_up.weight:"] for l in lines), lines
    assert any(l.split()[:3] == ["error", "nan_inf", "blk.0.ffn_up.weight:"] and "32 NaN and 0 Inf of 256 values, the first at flat index 32" in l for l in lines), lines


def test_a_model_folder_transformers_cannot_build_is_linted_alone_with_a_warning(clean, tmp_path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    shutil.copy(clean / "model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "architectures": ["NoSuchModel"]}))
    done = run_cli(["lint", str(folder)])
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("statebridge: warning: not checking against ") and "give --model or --no-model" in done.stderr
    assert done.stdout.splitlines()[0] == f"{folder}: 30 tensors"  # no model named
    done = run_cli(["lint", str(folder), "--model", str(folder)])  # asked for: an error
    assert done.returncode == 2 and done.stderr.startswith("statebridge: error: ")



@pytest.mark.slow
def test_a_tensor_larger_than_memory_allows_is_read_a_chunk_at_a_time(tmp_path) -> None:
    """One 240 MB tensor: lint's peak resident memory stays far below it (chunks of 8 MB), without torch."""
    x = torch.ones(60_000_000)
    x[59_999_999] = float("inf")
    save_file({"big": x}, tmp_path / "big.safetensors")
    del x
    done, peak = run_cli_peak(["lint", str(tmp_path / "big.safetensors")])
    assert done.returncode == 1 and "0 NaN and 1 Inf of 60000000 values, the first at flat index 59999999" in done.stdout, done.stdout + done.stderr
    assert peak < 120 * 2**20, f"peak RSS {peak / 2**20:.0f} MB for a 240 MB tensor"
