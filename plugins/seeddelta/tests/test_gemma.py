"""SeedΔ on the real Gemma 3 270M (Q4_K_M GGUF) with real captured activations: fit half and held-out half.

Two layers, all three FFN types (six tensors), at about the calibration's densities
(gate/up K=64 of 640 inputs, down K=128 of 2048).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb
from statebridge_seeddelta import metrics
from statebridge_seeddelta.build import Inputs, build
from statebridge_seeddelta.policy import Policy
from statebridge_seeddelta.runtime import open_layers

from .conftest import GEMMA_LAYERS

OPEN = {"min_mean": 0.0, "min_p05": None, "norm_ratio": None}  # every tensor emitted: the measures are the subject here


def policy(**defaults) -> Policy:
    return Policy({"version": 1, "defaults": {"K": {"gate": 64, "up": 64, "down": 128}, "strip": True,
                                              "gating": OPEN, **defaults}})


@pytest.fixture(scope="module")
def default_build(gemma_gguf: Path, gemma_inputs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gemma") / "seeded.gguf"
    fit, held = gemma_inputs
    report = build(str(gemma_gguf), str(out), policy=policy(), inputs=Inputs(str(fit), None, str(held)),
                   layers=set(GEMMA_LAYERS))
    return out, report


def entries(report: dict) -> list[dict]:
    return [t for layer in report["layers"].values() for t in layer["tensors"].values()]


def test_the_file_keeps_every_field_and_tensor_of_the_model(gemma_gguf: Path, default_build) -> None:
    out, report = default_build
    src, dst = gguf.GGUFReader(gemma_gguf), gguf.GGUFReader(out)
    for name, field in src.fields.items():
        if name.startswith(("GGUF.", "statebridge.", "general.file_type")):
            continue
        assert name in dst.fields, name
        assert dst.fields[name].types == field.types, name
        assert dst.fields[name].contents() == field.contents(), name
    stripped = {t["weight"] for t in entries(report) if t["decision"]["strip_applied"]}
    assert len(stripped) == 6
    kept = {t.name: t for t in dst.tensors}
    for t in src.tensors:
        if t.name in stripped:
            assert t.name not in kept
            continue
        assert kept[t.name].tensor_type == t.tensor_type and np.array_equal(kept[t.name].data, t.data), t.name
    assert dst.fields["seeddelta.policy_hash"].contents() == report["build"]["policy_hash"]
    assert dst.fields["seeddelta.weights"].contents() == [t["weight"] for t in entries(report)]
    assert dst.fields["seeddelta.K"].contents() == [t["fit"]["K"] for t in entries(report)]
    assert all(len(t.name.encode()) < 64 for t in dst.tensors)


def test_open_layers_reproduces_the_report(gemma_inputs, default_build) -> None:
    out, report = default_build
    held = load_file(gemma_inputs[1])
    layers = open_layers(out)
    with sb.open_source(str(Path(report["build"]["model"]))) as src:
        for entry in entries(report):
            w = src.load(entry["weight"]).float()
            x = held[entry["weight"]]
            got = metrics.output_metrics(x @ w.T, layers[entry["weight"]](x))
            for key, value in got.items():
                assert abs(value - entry["metrics"][key]) < 1e-3, (entry["weight"], key)


def test_the_default_method_beats_top_k_at_equal_bytes(default_build) -> None:
    _, report = default_build
    gains = []
    for entry in entries(report):
        assert entry["fit"]["bytes"] <= entry["topk_same_bytes"]["bytes"] + 4 * entry["shape"][0]  # one K of slack
        gains.append(entry["metrics"]["cos_mean_x_w"] - entry["topk_same_bytes"]["metrics"]["cos_mean_x_w"])
    assert sum(gains) / len(gains) >= 0.015, gains


def test_row_scale_keeps_the_norm_ratio_near_one(default_build) -> None:
    _, report = default_build
    for entry in entries(report):
        if entry["metrics"]["cos_mean_x_w"] >= 0.9:
            assert abs(entry["metrics"]["norm_ratio_x_w"] - 1) <= 0.05, entry["weight"]


def test_the_xor_circulant_base_is_never_worse_than_top_k(gemma_gguf: Path, gemma_inputs) -> None:
    fit, held = gemma_inputs
    report = build(str(gemma_gguf), None, policy=policy(base="xor_circulant"), inputs=Inputs(str(fit), None, str(held)),
                   layers={GEMMA_LAYERS[0]})
    for entry in entries(report):
        assert entry["fit"]["base_check"]["requested"] == "xor_circulant"
        gain = entry["metrics"]["cos_mean_x_w"] - entry["topk_same_bytes"]["metrics"]["cos_mean_x_w"]
        assert gain >= -0.002, (entry["weight"], gain, entry["fit"]["base_check"])


def test_the_model_with_its_seeddelta_layers_is_measured_end_to_end(gemma_gguf: Path, default_build) -> None:
    """Two layers (six weights at 6-10 % density) swapped into transformers' Gemma: the output moves (mean KLD
    about 0.9 on this text: every tensor is emitted here, ungated); the bytes are what gguf reads."""
    import pydoc

    from statebridge_seeddelta.evaluate import end_to_end

    out, report = default_build
    held = pydoc.render_doc(pydoc, renderer=pydoc.plaintext)  # not among the fit text's modules
    result = end_to_end(str(gemma_gguf), str(out), held, max_tokens=256, chunk=256)
    assert result["layers_swapped"] == 6 and result["tokens"] == 256
    assert 0.0 < result["mean_kld"] < 5.0 and 0.0 < result["same_top1"] < 1.0, result  # changed, not destroyed
    weights = {t["weight"] for t in entries(report)}
    src, dst = gguf.GGUFReader(gemma_gguf), gguf.GGUFReader(out)
    assert result["replaced_bytes_stored"] == sum(int(t.n_bytes) for t in src.tensors if t.name in weights)
    assert result["replaced_bytes_f16"] == sum(2 * int(t.n_elements) for t in src.tensors if t.name in weights)
    assert result["seeddelta_bytes"] == sum(int(t.n_bytes) for t in dst.tensors if ".sd_" in t.name)
