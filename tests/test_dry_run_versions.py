"""Dry runs that read no tensor data, cost estimates, and version chains."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb
from statebridge.trust.versions import Version
from statebridge import ConfigError, PlanError
from statebridge.cli import main
from statebridge.readers.base import Source

QKV = dict(
    inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
    output="model.layers.*.self_attn.qkv_proj.weight",
)


class HeadersOnly(Source):
    """A source whose data cannot be read at all: planning must not need it."""

    def __init__(self, inner: Source) -> None:
        self.inner, self.name = inner, inner.name

    def metas(self):
        return self.inner.metas()

    def load(self, key):
        raise AssertionError(f"tensor data of {key!r} was read")

    def raw_span(self, key):
        return self.inner.raw_span(key)


def test_plan_and_estimate_read_no_tensor_data(llama_file, tmp_path):
    audit: list[str] = []
    sys.addaudithook(lambda event, args: audit.append(event) if event == "mmap.__new__" else None)
    built = sb.plan(HeadersOnly(sb.open_source(llama_file)), [sb.Concat(**QKV), sb.Cast(dtype="bf16")])
    built.estimate = sb.estimate(built, tmp_path / "out")
    assert audit == []
    guess = built.estimate
    assert guess.bytes_written == built.bytes_written and guess.seconds > 0
    assert guess.peak_tensor_bytes == max(
        sum(built.source.metas()[k].nbytes for k in g.inputs) + sum(m.nbytes for m in g.outputs.values()) for g in built.groups
    )
    assert "estimate:" in built.render() and "about" in built.render()


def test_dry_run_on_the_command_line_writes_nothing(tmp_path, llama_file, capsys):
    (tmp_path / "c.yaml").write_text(f"source: {llama_file}\ntarget: out\nsteps:\n  - cast: {{dtype: fp16}}\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--dry-run", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)["estimate"]
    assert estimate["bytes_written"] == sum(t.numel() * 2 for t in load_file(llama_file).values())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard_size", ["60KB", None], ids=["shards", "one-file"])
def test_dry_run_lists_the_files_the_run_writes(tmp_path, llama_file, capsys, shard_size):
    """Names, sizes to the byte and the tensors of each file, from headers alone, before the run."""
    target = tmp_path / ("out" if shard_size else "out.safetensors")
    config = f"source: {llama_file}\ntarget: {target}\nmetadata: {{origin: test}}\nsteps:\n  - concat: {json.dumps(QKV)}\n"
    if shard_size:
        config += f"shard_size: {shard_size}\n"
    (tmp_path / "c.yaml").write_text(config)
    assert main(["run", str(tmp_path / "c.yaml"), "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["estimate"]["files"]
    assert main(["run", str(tmp_path / "c.yaml"), "--dry-run", "--verbose"]) == 0
    text = capsys.readouterr().out
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    written = sorted(target.iterdir()) if shard_size else [target]
    assert {f["name"]: f["bytes"] for f in planned} == {p.name: p.stat().st_size for p in written}
    if shard_size:
        assert len(planned) > 3 and planned[-1]["name"] == "model.safetensors.index.json"
        weight_map = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
        assert {k: f["name"] for f in planned for k in f["keys"]} == weight_map
    for f in planned:
        assert f["name"] in text


def test_real_run_reports_estimate_next_to_actual(tmp_path, llama_file):
    report = sb.run(llama_file, [sb.Concat(**QKV)], tmp_path / "out.safetensors")
    text = report.render()
    assert "estimate" in text and "actual" in text and "memory rise" in text
    assert report.plan.estimate.bytes_copied > 0 and report.peak_memory is not None


def test_bandwidth_is_measured_once_and_cached(tmp_path, monkeypatch):
    from statebridge.execute.estimate import probe

    monkeypatch.setenv("STATEBRIDGE_CACHE", str(tmp_path / "cache"))
    first = probe(tmp_path)
    assert first.measured and first.read > 0 and first.write > 0
    assert json.loads((tmp_path / "cache" / "bandwidth.json").read_text())
    assert probe(tmp_path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


VERSIONS = """
source: {source}
target: out.safetensors
versions:
  v1: {{signature: ["model.layers.*.self_attn.q_proj.weight"]}}
  v2: {{signature: ["model.layers.*.self_attn.qkv_proj.weight"], absent: ["model.layers.*.self_attn.q_proj.weight"]}}
  v3: {{signature: ["blocks.*.qkv"]}}
  v4: {{}}
rules:
  - from: v1
    to: v2
    steps:
      - concat: {{inputs: [model.layers.*.self_attn.q_proj.weight, model.layers.*.self_attn.k_proj.weight, model.layers.*.self_attn.v_proj.weight], output: model.layers.*.self_attn.qkv_proj.weight}}
  - from: v2
    to: v3
    steps:
      - rename: {{pattern: "model.layers.*.self_attn.qkv_proj.weight", to: "blocks.*.qkv"}}
  - from: v1
    to: v1b
    steps:
      - cast: {{dtype: fp16}}
"""


def test_version_chain_is_one_pass(tmp_path, llama_file, llama_sd):
    (tmp_path / "c.yaml").write_text(VERSIONS.format(source=llama_file).replace("  v4: {}\n", "  v4: {}\n  v1b: {}\n"))
    config = sb.load_config(tmp_path / "c.yaml", **{"from": "v1", "to": "v3"})
    pipeline = config.pipeline()
    built = sb.plan(llama_file, pipeline)
    group = next(g for g in built.groups if "blocks.0.qkv" in g.outputs)
    assert group.inputs == tuple(f"model.layers.0.self_attn.{x}_proj.weight" for x in "kqv")  # both hops, one group, in file order
    assert built.lineage["blocks.0.qkv"].ops == ("concat(dim=0)", "rename")
    assert main(["run", str(tmp_path / "c.yaml"), "--to", "v3", "--no-progress"]) == 0  # --from detected: v1
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["blocks.1.qkv"], torch.cat([llama_sd[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]))


def test_version_errors_name_the_missing_edge(tmp_path, llama_file, capsys):
    (tmp_path / "c.yaml").write_text(VERSIONS.format(source=llama_file).replace("  v4: {}\n", "  v4: {}\n  v1b: {}\n"))
    with pytest.raises(PlanError) as e:
        sb.load_config(tmp_path / "c.yaml", **{"from": "v1", "to": "v4"})
    assert "no chain of rules from 'v1' to 'v4': from 'v1' the rules reach v1b, v2, v3; add a rule into 'v4'" in str(e.value)
    with pytest.raises(ConfigError, match="unknown version 'v9'"):
        sb.load_config(tmp_path / "c.yaml", **{"from": "v1", "to": "v9"})
    with pytest.raises(ConfigError, match="choose the target with to: or --to"):
        sb.load_config(tmp_path / "c.yaml")
    assert main(["plan", str(tmp_path / "c.yaml"), "--from", "v3", "--to", "v1"]) == 2
    assert "no chain of rules from 'v3' to 'v1'" in capsys.readouterr().err


def test_version_detection(llama_sd):
    graph = sb.VersionGraph(
        {"a": Version(signature=["model.**"]), "b": Version(signature=["lm_head.weight"])}, []
    )
    with pytest.raises(PlanError, match="matches the signatures of a, b"):
        graph.detect(sb.DictSource(llama_sd).metas())
    with pytest.raises(PlanError, match="matches no version's signature"):
        graph.detect({"x": sb.TensorMeta((1,), torch.float32)})
