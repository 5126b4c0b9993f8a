"""Config files (YAML, TOML, JSON) and the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from statebridge import ConfigError
from statebridge.cli import main
from statebridge.config import load_config
from statebridge.options import parse_size

YAML = """
source: llama.safetensors
target: out
shard_size: 100KB
metadata: {origin: test}
steps:
  - concat:
      inputs: [model.layers.*.self_attn.q_proj.weight, model.layers.*.self_attn.k_proj.weight, model.layers.*.self_attn.v_proj.weight]
      output: model.layers.*.self_attn.qkv_proj.weight
  - cast: {dtype: bf16}
"""
TOML = """
source = "llama.safetensors"
target = "out"
shard_size = "100KB"
metadata = {origin = "test"}

[[steps]]
[steps.concat]
inputs = ["model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight", "model.layers.*.self_attn.v_proj.weight"]
output = "model.layers.*.self_attn.qkv_proj.weight"

[[steps]]
cast = {dtype = "bf16"}
"""


@pytest.fixture
def configs(tmp_path, llama_file):
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.toml").write_text(TOML)
    import yaml

    (tmp_path / "c.json").write_text(json.dumps(yaml.safe_load(YAML)))
    return tmp_path


def test_yaml_toml_json_give_the_same_pipeline(configs):
    specs = [load_config(configs / f"c.{ext}").pipeline().spec() for ext in ("yaml", "toml", "json")]
    assert specs[0] == specs[1] == specs[2]
    config = load_config(configs / "c.yaml")
    assert config.source == str(configs / "llama.safetensors") and config.shard_size == 100_000


def test_cli_plan_run_inspect(configs, capsys):
    assert main(["plan", str(configs / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "21 mapped" in out and "concat(dim=0) -> cast(dtype=bfloat16, integers=False)" in out
    assert not (configs / "out").exists()
    assert main(["run", str(configs / "c.yaml"), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["target tensors"] == 17
    assert not (configs / "out").exists()
    assert main(["run", str(configs / "c.yaml"), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    index = json.loads((configs / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["origin"] == "test"
    assert main(["inspect", str(configs / "out")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\.layers\.\{0\.\.1\}\.self_attn\.qkv_proj\.weight +bfloat16\[128, 64\] +2", out)


def test_cli_inverse_round_trip(configs, capsys, llama_sd):
    assert main(["run", str(configs / "c.toml"), "--no-progress", "--target", str(configs / "fused")]) == 0
    (configs / "lossless.yaml").write_text(YAML.replace("  - cast: {dtype: bf16}\n", ""))
    assert main(["run", str(configs / "lossless.yaml"), "--no-progress"]) == 0
    assert main(["run", str(configs / "lossless.yaml"), "--inverse", "--source", str(configs / "out"), "--target", str(configs / "back.safetensors"), "--no-progress"]) == 0
    back = load_file(configs / "back.safetensors")
    assert all(torch.equal(back[k], v) for k, v in llama_sd.items()) and back.keys() == llama_sd.keys()
    assert main(["run", str(configs / "c.yaml"), "--inverse", "--source", str(configs / "out"), "--target", str(configs / "x")]) == 2
    assert "cast float32 -> bfloat16 loses information" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("source: a\nsteps: [", "c.yaml: not valid yaml"),
        ("source: a\nsteps:\n  - rename: {mapping: {a: b}}\n    cast: {dtype: fp16}\n", "steps[0]: a step is a mapping with exactly one transform name"),
        ("source: a\nsoruce: b\n", "soruce: Extra inputs are not permitted"),
        ("source: a\nsteps:\n  - rename: {mapping: {a: b}}\n  - concat: {inputs: [a], output: b, dim: zero}\n", "steps[1]: concat.dim: Input should be a valid integer"),
        ("source: a\nsteps:\n  - renamee: {mapping: {a: b}}\n", "steps[0]: unknown transform 'renamee'; did you mean 'rename'"),
        (
            "source: a\nsteps:\n  - rename: {mapping: {a: b}}\n  - sequential: {steps: [{nosuch: {}}]}\n",
            "steps[1]: sequential.steps[0]: unknown transform 'nosuch'",
        ),
        (
            "source: a\nfrom: v1\nto: v2\nversions: {v1: {}, v2: {}}\nrules:\n  - {from: v1, to: v2, steps: [{nosuch: {}}]}\n",
            "rule v1->v2: steps[0]: unknown transform 'nosuch'",
        ),
        ("source: a\nsteps:\n  - rename: {pattern: 're:(', to: x}\n", "pattern 're:(' is not a valid regular expression"),
        ("source: a\nshard_size: 2 parsecs\n", "cannot read size '2 parsecs'"),
    ],
)
def test_config_errors_point_at_the_step_and_field(tmp_path, text, message):
    (tmp_path / "a").touch()
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "c.yaml"))


def test_sizes():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(7) == 7


def test_schema_lists_every_transform(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    names = {alt["title"] for alt in schema["properties"]["steps"]["items"]["oneOf"]}
    assert {"rename", "concat", "adapt_shapes", "value_op", "scope"} <= names
    assert "source" in schema["required"]


def test_plugins_lists_the_core(capsys):
    assert main(["plugins", "--json"]) == 0
    core = next(p for p in json.loads(capsys.readouterr().out) if p["name"] == "statebridge")
    assert "rename" in core["provides"]["transforms"] and "safetensors" in core["provides"]["writers"]
    assert "validate_plan" in core["hooks"] and "inspect" in core["provides"]["commands"]


def test_a_missing_source_names_the_resolved_path_and_the_rule(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text("source: ../ckpt/llama\ntarget: out\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "conf" / "c.yaml")
    assert str(e.value) == (
        f"{tmp_path / 'conf' / 'c.yaml'}: source '../ckpt/llama' is {tmp_path / 'ckpt' / 'llama'}, which does not exist "
        "(paths in a config are relative to its folder)"
    )


def test_cli_errors_are_one_line_without_traceback(tmp_path, llama_file):
    (tmp_path / "c.yaml").write_text("source: llama.safetensors\ntarget: o\nsteps:\n  - rename: {mapping: {lm_haed.weight: x}}\n")
    result = subprocess.run([sys.executable, "-m", "statebridge", "run", str(tmp_path / "c.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "statebridge: error: steps[0] (rename): source key 'lm_haed.weight' (named in the rename mapping) is not in the state; did you mean 'lm_head.weight'?"
    ]
    assert not (tmp_path / "o").exists()


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """``statebridge inspect big.safetensors --json | head -c 100``: no traceback when head exits."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    def letters(i: int) -> str:  # names with no numbers in them, so inspect cannot fold them into ranges
        return "".join("abcdefghijklmnopqrstuvwxyz"[(i // 26**d) % 26] for d in range(4))

    save_file({f"{letters(i)}.weight": torch.zeros(1) for i in range(5000)}, tmp_path / "many.safetensors")
    process = subprocess.Popen(
        [sys.executable, "-m", "statebridge", "inspect", "--json", str(tmp_path / "many.safetensors")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.read(100)  # type: ignore[union-attr]
    process.stdout.close()  # type: ignore[union-attr]
    stderr = process.stderr.read().decode()  # type: ignore[union-attr]
    assert process.wait(timeout=60) in (0, 1)  # not 120 (Python failing to flush at exit)
    assert stderr == "", stderr
