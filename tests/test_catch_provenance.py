"""Fingerprints and provenance (docs/trust.md, "Fingerprints and lineage").

The fingerprint must change with everything that can change the output for the same parameters
(a transform's ``version``, the plugin providing it, the core's version), and every output that
has room for metadata (each safetensors shard, the shard index, GGUF) must carry it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from safetensors import safe_open

import statebridge as sb
import statebridge.planning.fingerprint as fingerprint_module
from statebridge.planning.fingerprint import fingerprint as fingerprint_with
from statebridge.plugins import installed
from statebridge.tensors.provenance import FINGERPRINT_KEY, LINEAGE_KEY, VERSION_KEY


def fingerprint(pipeline: sb.Pipeline) -> str:
    """The fingerprint with the installed plugins as the providers of each transform (as plans compute it)."""
    return fingerprint_with(pipeline, installed().providers())

QKV = sb.Concat(
    inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"], output="model.layers.*.self_attn.qkv_proj.weight"
)


class RenameV2(sb.Rename):
    """The same transform, after a change of behaviour its author marked by bumping ``version``."""

    version = "2"


def test_the_fingerprint_changes_with_a_transform_version(monkeypatch):
    same = {"mapping": {"a": "b"}}
    assert fingerprint(sb.Pipeline([sb.Rename(**same)])) == fingerprint(sb.Pipeline([sb.Rename(**same)]))
    assert fingerprint(sb.Pipeline([sb.Rename(**same)])) != fingerprint(sb.Pipeline([RenameV2(**same)]))
    # nested steps count too
    nested = [sb.Scope(prefix="model.", steps=[sb.Rename(**same)])]
    bumped = [sb.Scope(prefix="model.", steps=[RenameV2(**same)])]
    assert fingerprint(sb.Pipeline(nested)) != fingerprint(sb.Pipeline(bumped))


def test_the_fingerprint_changes_with_the_core_version(monkeypatch):
    pipeline = sb.Pipeline([sb.Cast(dtype="bf16")])
    before = fingerprint(pipeline)
    monkeypatch.setattr(fingerprint_module, "__version__", "99.0.0")
    assert fingerprint(pipeline) != before


def test_the_fingerprint_changes_with_the_plugin_that_provides_a_transform(monkeypatch):
    pipeline = sb.Pipeline([sb.Cast(dtype="bf16")])
    before = fingerprint(pipeline)
    providers = {**installed().providers(), "cast": "someone-else 9.9"}
    assert fingerprint_with(pipeline, providers) != before


def test_the_fingerprint_changes_with_parameters_but_not_with_their_spelling():
    assert fingerprint(sb.Pipeline([sb.Cast(dtype="bf16")])) == fingerprint(sb.Pipeline([sb.Cast(dtype="bfloat16")]))
    assert fingerprint(sb.Pipeline([sb.Cast(dtype="bf16")])) != fingerprint(sb.Pipeline([sb.Cast(dtype="fp16")]))
    assert fingerprint(sb.Pipeline([sb.Cast(dtype="bf16")])) != fingerprint(sb.Pipeline([sb.Cast(dtype="bf16", integers=True)]))


def check_provenance(metadata: dict[str, str], plan: sb.Plan) -> None:
    assert metadata[FINGERPRINT_KEY] == plan.fingerprint
    assert metadata[VERSION_KEY] == sb.__version__
    lineage = json.loads(metadata[LINEAGE_KEY])
    assert lineage["model.layers.1.self_attn.qkv_proj.weight"] == {
        "from": [f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv"],
        "ops": ["concat(dim=0)"],
    }
    assert "lm_head.weight" not in lineage  # untouched tensors are not listed
    assert metadata["origin"] == "unit test"  # the config's metadata, beside the provenance


def test_every_shard_and_the_index_carry_the_provenance(tmp_path, llama_file):
    report = sb.run(llama_file, [QKV], tmp_path / "out", shard_size=60_000, metadata={"origin": "unit test"}, progress=False)
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 3
    for shard in shards:
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        assert metadata["format"] == "pt"
        check_provenance(metadata, report.plan)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    check_provenance(index["metadata"], report.plan)
    assert index["metadata"]["total_size"] == sum(m.nbytes for m in report.plan.outputs.values())
    assert sb.open_source(tmp_path / "out").metadata[FINGERPRINT_KEY] == report.plan.fingerprint


def test_a_gguf_output_carries_the_provenance(tmp_path, llama_file):
    report = sb.run(llama_file, [QKV], tmp_path / "out.gguf", metadata={"origin": "unit test"}, progress=False)
    reader = gguf.GGUFReader(tmp_path / "out.gguf")  # the llama.cpp project's own reader
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    check_provenance(fields, report.plan)
    assert fields["general.architecture"] == "statebridge"
    assert sb.open_source(tmp_path / "out.gguf").metadata[FINGERPRINT_KEY] == report.plan.fingerprint


@pytest.mark.parametrize("target", ["out.safetensors", "out", "out.gguf"])
def test_inspect_shows_the_fingerprint_of_every_output_that_has_one(tmp_path, llama_file, capsys, target):
    from statebridge.cli import main

    report = sb.run(llama_file, [QKV], tmp_path / target, shard_size=60_000, progress=False)
    assert main(["inspect", str(tmp_path / target)]) == 0
    assert f"fingerprint {report.plan.fingerprint}" in capsys.readouterr().out


def test_the_same_config_gives_the_same_fingerprint_in_the_output(tmp_path, llama_file):
    a = sb.run(llama_file, [QKV], tmp_path / "a.safetensors", progress=False)
    b = sb.run(Path(llama_file), [QKV], tmp_path / "elsewhere" / "b.safetensors", progress=False)
    assert a.plan.fingerprint == b.plan.fingerprint
    with safe_open(tmp_path / "a.safetensors", "pt") as fa, safe_open(tmp_path / "elsewhere" / "b.safetensors", "pt") as fb:
        assert fa.metadata() == fb.metadata()
