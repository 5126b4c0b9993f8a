"""Policy merge, gating, autotune, per-tensor strip, sidecar and the runtime, on a small llama written by statebridge.testing."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import save_file

import statebridge as sb
from statebridge.testing import LlamaShape, run_cli, write_llama
from statebridge_seeddelta import metrics
from statebridge_seeddelta.build import Inputs, build
from statebridge_seeddelta.policy import Policy
from statebridge_seeddelta.runtime import open_layers, swap_into

SHAPE = LlamaShape(layers=3, hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A float32 llama, and fit / held-out inputs for its FFN weights (correlated Gaussians)."""
    root = tmp_path_factory.mktemp("llama")
    path = write_llama(root / "llama.safetensors", SHAPE, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    mix = {64: torch.randn(64, 64, generator=gen), 128: torch.randn(128, 128, generator=gen)}
    fit, held = {}, {}
    with sb.open_source(path) as src:
        for key, meta in src.metas().items():
            if ".mlp." in key:
                inp = meta.shape[1]
                fit[key] = torch.randn(256, inp, generator=gen) @ mix[inp]
                held[key] = torch.randn(256, inp, generator=gen) @ mix[inp]
    save_file(fit, root / "fit.safetensors")
    save_file(held, root / "held.safetensors")
    return path, root / "fit.safetensors", root / "held.safetensors"


def test_policy_merge_order_is_defaults_ranges_layer_tensor() -> None:
    p = Policy({"version": 1, "defaults": {"K": {"gate": 10, "up": 11, "down": 12}, "gating": {"min_mean": 0.5}},
                "ranges": [{"layers": "1-2", "K": 20, "gating": {"min_p05": 0.1}}, {"layers": "2", "K": 30}],
                "layers": {"2": {"strip": True, "tensors": {"ffn_up": {"K": 40}}}}})
    assert [p.resolve(0, "ffn_gate").spec.K, p.resolve(0, "ffn_down").spec.K] == [10, 12]
    assert p.resolve(1, "ffn_gate").spec.K == 20
    assert p.resolve(2, "ffn_gate").spec.K == 30  # ranges in file order: the later one wins
    up = p.resolve(2, "ffn_up")
    assert up.spec.K == 40 and up.strip and not p.resolve(1, "ffn_up").strip
    assert (up.gating.min_mean, up.gating.min_p05) == (0.5, 0.1)  # nested objects merge key by key
    assert p.resolve(0, "ffn_up").gating.min_p05 == 0.30  # the built-in, per type
    same = Policy(json.loads(json.dumps(p.raw, sort_keys=True)))
    assert same.hash == p.hash and Policy({"version": 1}).hash != p.hash


@pytest.mark.parametrize("document, where", [
    ({"version": 1, "layers": {"3": {"tensors": {"ffn_up": {"K": "many"}}}}}, "layers.3.tensors.ffn_up.K"),
    ({"version": 1, "ranges": [{"layers": "9-4"}]}, "ranges.0.layers"),
    ({"version": 1, "defaults": {"gating": {"min_maen": 0.3}}}, "defaults.gating.min_maen"),
    ({"version": 1, "layers": {"x": {}}}, "layers"),
    ({"version": 1, "defaults": {"autotune": {"schedule": [256, 128]}}}, "autotune.schedule"),
])
def test_a_malformed_policy_names_its_path_in_one_line(tmp_path: Path, model, document, where) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    done = run_cli(["seeddelta", "build", str(model[0]), str(tmp_path / "o.gguf"), "--policy", str(path),
                    "--activations", str(model[1])])
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"{path}" in done.stderr and where in done.stderr, done.stderr


def test_autotune_stops_at_the_first_passing_k_and_records_every_attempt(model) -> None:
    path, fit, held = model
    policy = Policy({"version": 1, "defaults": {"base": "none", "gating": {"min_mean": 0.9, "min_p05": None,
                                                                          "norm_ratio": None},
                                                "autotune": {"enabled": True, "schedule": [4, 16, 48, 96, 128]}}})
    report = build(str(path), None, policy=policy, inputs=Inputs(str(fit), None, str(held)), layers={0},
                   kinds={"ffn_up"})
    entry = report["layers"]["0"]["tensors"]["ffn_up"]
    attempts = entry["autotune"]["attempts"]
    assert [a["pass"] for a in attempts[:-1]] == [False] * (len(attempts) - 1) and attempts[-1]["pass"]
    assert all(a["metrics"]["cos_mean_x_w"] < 0.9 for a in attempts[:-1]) and attempts[-1]["metrics"]["cos_mean_x_w"] >= 0.9
    assert entry["fit"]["K"] == attempts[-1]["K"] and len(attempts) < 5
    assert entry["decision"]["emit_delta"] and entry["gating"]["pass"]


def test_a_tensor_that_never_passes_stays_dense_and_is_marked_unsafe(model, tmp_path: Path) -> None:
    path, fit, held = model
    policy = Policy({"version": 1, "defaults": {"base": "none", "strip": True, "gating": {"min_mean": 0.999},
                                                "autotune": {"enabled": True, "schedule": [2, 4]}}})
    out = tmp_path / "o.gguf"
    report = build(str(path), str(out), policy=policy, inputs=Inputs(str(fit), None, str(held)), layers={1},
                   kinds={"ffn_down", "ffn_up"})
    entry = report["layers"]["1"]["tensors"]["ffn_down"]
    assert not entry["decision"]["emit_delta"] and "unsafe" in entry["decision"]["reason"]
    assert [a["K"] for a in entry["autotune"]["attempts"]] == [2, 4]  # the best attempt kept for diagnosis
    assert entry["metrics"] == max((a["metrics"] for a in entry["autotune"]["attempts"]), key=lambda m: m["cos_mean_x_w"])
    reader = gguf.GGUFReader(out)
    assert reader.fields["seeddelta.unsafe"].contents() == ["model.layers.1.mlp.up_proj.weight",
                                                            "model.layers.1.mlp.down_proj.weight"]
    names = {t.name for t in reader.tensors}
    assert "model.layers.1.mlp.down_proj.weight" in names and not any(".sd_" in n for n in names)


def test_strip_is_per_tensor_and_only_where_a_replacement_passed(model, tmp_path: Path) -> None:
    path, fit, held = model
    policy = Policy({"version": 1, "defaults": {"base": "none", "K": 48, "strip": False,
                                                "gating": {"min_mean": 0.0, "min_p05": None, "norm_ratio": None}},
                     "layers": {"0": {"tensors": {"ffn_up": {"strip": True}, "ffn_gate": {"strip": True,
                                                                                           "gating": {"min_mean": 0.9999}}}}}})
    out = tmp_path / "o.gguf"
    report = build(str(path), str(out), policy=policy, inputs=Inputs(str(fit), None, str(held)), layers={0})
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "model.layers.0.mlp.up_proj.weight" not in names and "model.layers.0.mlp.up_proj.sd_val" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate_proj.sd_val" not in names
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.sd_val" in names
    assert report["layers"]["0"]["tensors"]["ffn_up"]["decision"]["strip_applied"] is True
    assert reader.fields["seeddelta.stripped"].contents() == [1, 0]  # up (stripped), down (kept dense)
    assert reader.fields["seeddelta.strip_dense"].contents() is True
    with sb.open_source(path) as src:
        assert len(names) == len(src.metas()) - 1 + 2 * 3  # one dense gone; idx, val, rs for two weights


def test_sidecar_leaves_the_model_alone(model, tmp_path: Path) -> None:
    path, fit, held = model
    out = tmp_path / "side.gguf"
    policy = Policy({"version": 1, "defaults": {"base": "xor_circulant", "K": 32, "strip": True,
                                                "gating": {"min_mean": 0.0, "min_p05": None, "norm_ratio": None}}})
    build(str(path), str(out), policy=policy, inputs=Inputs(str(fit), None, str(held)), layers={2}, sidecar=True)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "seeddelta"
    assert all(".sd_" in t.name for t in reader.tensors) and len(reader.tensors) >= 9
    layers = open_layers(out, dense=None)
    assert len(layers) == 3
    with sb.open_source(path) as src:
        for name, layer in layers.items():
            assert layer.dense is None
            w = src.load(name).float()
            x = torch.randn(5, w.shape[1])
            assert torch.allclose(layer(x), x @ layer.reconstruct().T, atol=1e-4)


def test_the_file_reproduces_its_report_and_swaps_into_a_model(model, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path, fit, held = model
    out, rep = tmp_path / "o.gguf", tmp_path / "r.json"
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"version": 1, "defaults": {"K": 32, "gating": {"min_mean": 0.0, "min_p05": None,
                                                                             "norm_ratio": None}},
                               "layers": {"1": {"base": "xor_circulant"}}}))
    done = run_cli(["seeddelta", "build", str(path), str(out), "--policy", str(pol), "--activations", str(fit),
                    "--eval-x", str(held), "--report-json", str(rep), "--layers", "0-1"])
    assert done.returncode == 0, done.stderr
    report = json.loads(rep.read_text())
    assert report["build"]["policy_hash"] == Policy.load(pol).hash and report["summary"]["emitted"] == 6
    x_held = load_file(held)
    import statebridge_seeddelta

    layers = statebridge_seeddelta.open_layers(out)  # the package's own name for it
    with sb.open_source(path) as src:
        for name, layer in layers.items():
            w = src.load(name).float()
            assert layer.dense is not None and torch.equal(layer.dense, w)  # not stripped: the guard has it
            got = metrics.output_metrics(x_held[name] @ w.T, layer(x_held[name]))
            layer_no, kind = name.split(".")[2], {"gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                                  "down_proj": "ffn_down"}[name.split(".")[4]]
            want = report["layers"][layer_no]["tensors"][kind]["metrics"]
            assert all(abs(got[k] - want[k]) < 1e-3 for k in got), (name, got, want)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    sb.load_into(hf, path, strict=False)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        dense_logits = hf(ids).logits
        assert len(swap_into(hf, layers)) == 6
        seeded_logits = hf(ids).logits
    assert not torch.equal(dense_logits, seeded_logits)
    cos = torch.nn.functional.cosine_similarity(dense_logits, seeded_logits, dim=-1)
    assert float(cos.min()) > 0.5


def test_the_nan_guard_falls_back_or_fails_loudly(model, tmp_path: Path) -> None:
    path, fit, held = model
    out = tmp_path / "o.gguf"
    policy = Policy({"version": 1, "defaults": {"base": "none", "K": 16, "gating": {"min_mean": 0.0, "min_p05": None,
                                                                                   "norm_ratio": None}}})
    build(str(path), str(out), policy=policy, inputs=Inputs(str(fit)), layers={0}, kinds={"ffn_up"})
    layer = open_layers(out)["model.layers.0.mlp.up_proj.weight"]
    layer.row_scale[3] = float("inf")
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="dense weight"):
        assert torch.allclose(layer(x), x @ layer.dense.T)
    layer.dense = None
    with pytest.raises(sb.ExecutionError, match="up_proj.weight.*NaN/Inf"):
        layer(x)


def test_dry_run_fits_nothing(model) -> None:
    done = run_cli(["seeddelta", "build", str(model[0]), "--dry-run", "--layers", "0"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("would fit") == 3


@pytest.mark.parametrize("name", ["policy.example.qwen7b.json", "policy.example.gemma.json", "policy.strict.gemma.json"])
def test_the_example_policies_are_valid(name: str) -> None:
    p = Policy.load(Path(__file__).parent.parent / "policies" / name)
    for layer in range(24):
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            p.resolve(layer, kind)
    if "qwen" in name:
        assert not p.resolve(8, "ffn_up").enable and p.resolve(16, "ffn_down").autotune.schedule == [256, 512, 768, 1024]
        assert p.resolve(16, "ffn_gate").autotune.enabled and not p.resolve(10, "ffn_gate").autotune.enabled


def test_imatrix_files_give_the_importance_and_synthetic_inputs(model, tmp_path: Path) -> None:
    """Both llama.cpp layouts: the legacy .dat (sums of squares / calls) and the GGUF (in_sum2 / counts)."""
    import struct

    from statebridge_seeddelta.importance import read_imatrix

    path = model[0]
    name = "model.layers.0.mlp.up_proj.weight"
    sums = torch.arange(1, 65, dtype=torch.float32) * 3.0
    legacy = tmp_path / "imatrix.dat"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 3, 64)
    legacy.write_bytes(blob + struct.pack("<64f", *sums.tolist()) + struct.pack("<i", 10))
    assert torch.equal(read_imatrix(str(legacy))[name], sums / 3)
    writer = gguf.GGUFWriter(tmp_path / "imatrix.gguf", arch="imatrix")
    writer.add_tensor(f"{name}.in_sum2", (sums * 2).numpy().reshape(1, 64))
    writer.add_tensor(f"{name}.counts", torch.tensor([[6.0]]).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    assert torch.equal(read_imatrix(str(tmp_path / "imatrix.gguf"))[name], sums / 3)
    legacy.write_bytes(blob + b"\0" * 10)
    with pytest.raises(sb.SourceError, match="cut short"):
        read_imatrix(str(legacy))
    legacy.write_bytes(blob + struct.pack("<64f", *sums.tolist()))
    policy = Policy({"version": 1, "defaults": {"base": "none", "K": 16, "gating": {"min_mean": 0.0}}})
    report = build(str(path), None, policy=policy, inputs=Inputs(None, str(legacy)), layers={0})
    up = report["layers"]["0"]["tensors"]["ffn_up"]
    assert up["inputs"].startswith("imatrix") and "Gaussian" in up["inputs"] and up["decision"]["emit_delta"]
    assert report["layers"]["0"]["tensors"]["ffn_down"]["decision"]["reason"].startswith("no activations or imatrix")


def test_worker_processes_write_the_same_bytes(model, tmp_path: Path) -> None:
    path, fit, held = model
    policy = Policy({"version": 1, "defaults": {"K": 16, "gating": {"min_mean": 0.0}},
                     "layers": {"1": {"base": "xor_circulant"}}})
    outs = []
    for jobs in (1, 2):
        out = tmp_path / f"o{jobs}.gguf"
        build(str(path), str(out), policy=policy, inputs=Inputs(str(fit), None, str(held)), layers={0, 1}, jobs=jobs)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_the_report_plot(model, tmp_path: Path) -> None:
    path, fit, held = model
    rep, png = tmp_path / "r.json", tmp_path / "r.png"
    done = run_cli(["seeddelta", "build", str(path), str(tmp_path / "o.gguf"), "--activations", str(fit),
                    "--report-json", str(rep), "--layers", "0-2"])
    assert done.returncode == 0, done.stderr
    bad = run_cli(["seeddelta", "report", str(path), "--png", str(png)])
    assert bad.returncode == 2 and "not a seeddelta build report" in bad.stderr and bad.stderr.count("\n") == 1
    pytest.importorskip("matplotlib")
    done = run_cli(["seeddelta", "report", str(rep), "--png", str(png)])
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_other_registered_gates_vote_and_unknown_ones_are_refused(model, tmp_path: Path) -> None:
    path, fit, held = model
    policy = Policy({"version": 1, "defaults": {"base": "none", "K": 16, "gating": {"min_mean": 0.0}}})
    report = build(str(path), None, policy=policy, inputs=Inputs(str(fit), None, str(held), {"finite": True}),
                   layers={0}, kinds={"ffn_up"})
    votes = report["layers"]["0"]["tensors"]["ffn_up"]["autotune"]["attempts"][0]["votes"]
    assert [v["gate"] for v in votes] == ["seeddelta.quality", "finite"] and all(v["accept"] for v in votes)
    done = run_cli(["seeddelta", "build", str(path), str(tmp_path / "o.gguf"), "--activations", str(fit),
                    "--layers", "0", "--gate", "finit"])
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "finit" in done.stderr, done.stderr
