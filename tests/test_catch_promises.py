"""Documented promises that had no test: command-line flags, config forms, patterns, checks and writers.

Each test names the page and the promise it holds to (README.md, docs/config.md, docs/trust.md,
docs/formats.md, docs/scale.md); docs/testing.md has the whole table of promise -> test.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.cli import main
from statebridge.config import load_config
from statebridge.tensors.meta import human_bytes

QKV = {
    "inputs": [f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
    "output": "model.layers.*.self_attn.qkv_proj.weight",
}
FUSE = f"  - concat: {json.dumps(QKV)}\n"


def config(path: Path, source: Path | str, target: str | None = None, extra: str = "", steps: str = FUSE) -> Path:
    text = f"source: {source}\n" + (f"target: {target}\n" if target else "") + extra + ("steps:\n" + steps if steps else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the command line: plan / run / inspect flags -----------------------------------------------------


def test_overrides_on_the_command_line_are_relative_to_the_current_folder(tmp_path, llama_file, monkeypatch):
    """config.md: relative paths in a config are relative to the file; --source/--target to the current folder."""
    (tmp_path / "cfg").mkdir()
    save_file({"w": torch.ones(3)}, tmp_path / "cfg" / "src.safetensors")
    c = config(tmp_path / "cfg" / "c.yaml", "src.safetensors", "out.safetensors", steps="")
    (tmp_path / "work").mkdir()
    save_file({"v": torch.zeros(2)}, tmp_path / "work" / "other.safetensors")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["run", str(c), "--no-progress"]) == 0
    assert list(load_file(tmp_path / "cfg" / "out.safetensors")) == ["w"]
    assert main(["run", str(c), "--no-progress", "--source", "other.safetensors", "--target", "result.safetensors"]) == 0
    assert list(load_file(tmp_path / "work" / "result.safetensors")) == ["v"]
    assert main(["plan", str(c), "--source", "other.safetensors", "--json"]) == 0


def test_plan_json_is_the_plan_of_the_python_api(tmp_path, llama_file, capsys):
    c = config(tmp_path / "c.yaml", llama_file)
    assert main(["plan", str(c), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    planned = sb.plan(llama_file, [sb.Concat(**QKV)])
    assert shown["fingerprint"] == planned.fingerprint
    assert shown["counts"] == planned.counts()
    assert len(shown["groups"]) == len(planned.groups)


def test_verbose_lists_every_key_instead_of_folded_ranges(tmp_path, llama_file, capsys):
    c = config(tmp_path / "c.yaml", llama_file)
    assert main(["plan", str(c)]) == 0
    folded = capsys.readouterr().out
    assert "model.layers.{0..1}.self_attn.qkv_proj.weight" in folded
    assert main(["plan", str(c), "--verbose"]) == 0
    listed = capsys.readouterr().out
    assert "model.layers.0.self_attn.qkv_proj.weight" in listed and "model.layers.1.self_attn.qkv_proj.weight" in listed
    assert "{0..1}" not in listed


def test_shard_size_and_format_on_the_command_line(tmp_path, llama_file):
    c = config(tmp_path / "c.yaml", llama_file, steps="")
    assert main(["run", str(c), "--no-progress", "--shard-size", "60KB", "--target", str(tmp_path / "shards")]) == 0
    shards = sorted((tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) > 3
    for shard in shards:
        tensors = load_file(shard)
        assert sum(t.nbytes for t in tensors.values()) <= 60_000 or len(tensors) == 1
    # --format names the writer where the suffix does not tell one
    assert main(["run", str(c), "--no-progress", "--target", str(tmp_path / "out.ckpt")]) == 2
    assert main(["run", str(c), "--no-progress", "--format", "torch", "--target", str(tmp_path / "out.ckpt")]) == 0
    assert len(torch.load(tmp_path / "out.ckpt", weights_only=True)) == 21


def test_expect_and_require_on_the_command_line(tmp_path, llama_file, capsys):
    save_file({"model.norm.weight": torch.zeros(64), "missing.weight": torch.zeros(2)}, tmp_path / "spec.safetensors")
    c = config(tmp_path / "c.yaml", llama_file, "out.safetensors")
    assert main(["run", str(c), "--expect", str(tmp_path / "spec.safetensors"), "--require", "no_missing"]) == 2
    err = capsys.readouterr().err
    assert "error (no_missing): 1 keys of the target spec are not produced: missing.weight" in err
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["plan", str(c), "--expect", str(tmp_path / "spec.safetensors")]) == 0  # without no_missing: a warning
    assert "warning (no_missing)" in capsys.readouterr().out


def test_on_collision_warn_on_the_command_line_and_in_the_config(tmp_path, capsys):
    save_file({"a.weight": torch.zeros(2), "b.weight": torch.ones(2)}, tmp_path / "s.safetensors")
    steps = "  - rename: {mapping: {a.weight: w, b.weight: w}}\n"
    c = config(tmp_path / "c.yaml", "s.safetensors", "out.safetensors", steps=steps)
    assert main(["run", str(c), "--no-progress"]) == 2
    assert "would be written twice" in capsys.readouterr().err
    assert main(["run", str(c), "--no-progress", "--on-collision", "warn"]) == 0
    assert "kept the last" in capsys.readouterr().out
    assert load_file(tmp_path / "out.safetensors")["w"].tolist() == [1.0, 1.0]
    c = config(tmp_path / "d.yaml", "s.safetensors", "d.safetensors", extra="on_collision: warn\n", steps=steps)
    assert main(["run", str(c), "--no-progress"]) == 0
    assert load_file(tmp_path / "d.safetensors")["w"].tolist() == [1.0, 1.0]


def in_flight(report: str) -> tuple[str, str]:
    """The two figures of the report's ``tensors in flight at most X of a Y budget`` line."""
    match = re.search(r"tensors in flight at most (.+?) of a (.+?) budget", report)
    assert match, report
    return match[1], match[2]


CASTS = "  - cast: {pattern: 'model.layers.**', dtype: fp16}\n"


def test_max_memory_and_workers_on_the_command_line_and_in_the_config(tmp_path, llama_file, capsys):
    c = config(tmp_path / "c.yaml", llama_file, steps=CASTS)
    assert main(["run", str(c), "--no-progress", "--max-memory", "3MB", "--workers", "1", "--target", str(tmp_path / "one.safetensors")]) == 0
    one, budget = in_flight(capsys.readouterr().out)
    assert budget == human_bytes(3 * 10**6)
    assert main(["run", str(c), "--no-progress", "--max-memory", "3MB", "--workers", "3", "--target", str(tmp_path / "three.safetensors")]) == 0
    three, _ = in_flight(capsys.readouterr().out)
    assert float(three.split()[0]) > float(one.split()[0])  # the workers held several groups at once
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "three.safetensors").read_bytes()
    c = config(tmp_path / "d.yaml", llama_file, extra="max_memory: 2MiB\nworkers: 3\n", steps=CASTS)
    assert main(["run", str(c), "--no-progress", "--target", str(tmp_path / "d.safetensors")]) == 0
    assert in_flight(capsys.readouterr().out) == (three, human_bytes(2 * 2**20))


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_silences_the_progress_bar(tmp_path, llama_file, monkeypatch):
    c = config(tmp_path / "c.yaml", llama_file, steps=CASTS)
    for flag, shown in (([], True), (["--no-progress"], False)):
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["run", str(c), *flag, "--target", str(tmp_path / f"{shown}.safetensors")]) == 0
        assert ("statebridge: 100%" in terminal.getvalue()) is shown, terminal.getvalue()


def test_inspect_json_and_the_summary_line(tmp_path, llama_file, capsys):
    assert main(["inspect", str(llama_file)]) == 0
    text = capsys.readouterr().out
    elements = sum(t.numel() for t in load_file(llama_file).values())
    assert f"21 tensors, {elements:,} elements, 427.3 KB; 21 float32" in text  # README's format (decimal units)
    assert re.search(r"model\.layers\.\{0\.\.1\}\.self_attn\.q_proj\.weight +float32\[64, 64\] +2", text)
    report = sb.run(llama_file, [sb.Concat(**QKV)], tmp_path / "out.safetensors", progress=False)
    assert main(["inspect", str(tmp_path / "out.safetensors"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tensors"] == 17 and shown["bytes"] == report.plan.bytes_written
    assert shown["metadata"]["statebridge.fingerprint"] == report.plan.fingerprint
    assert shown["lineage"]["model.layers.0.self_attn.qkv_proj.weight"]["ops"] == ["concat(dim=0)"]


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"statebridge {sb.__version__}"


def test_a_dry_run_lists_twelve_files_unless_verbose_and_json_lists_all(tmp_path, llama_file, capsys):
    c = config(tmp_path / "c.yaml", llama_file, "out", extra="shard_size: 20KB\n", steps="")
    assert main(["run", str(c), "--dry-run"]) == 0
    short = capsys.readouterr().out
    files = re.search(r"files \((\d+)\):", short)
    assert files and int(files[1]) > 12
    more = int(files[1]) - 11
    assert f"... {more} more (--verbose or --json lists them all)" in short
    assert len(re.findall(r"^    model-\d{5}-of-\d{5}\.safetensors", short, re.M)) == 11
    assert main(["run", str(c), "--dry-run", "--verbose"]) == 0
    assert len(re.findall(r"^    model-\d{5}-of-\d{5}\.safetensors", capsys.readouterr().out, re.M)) == int(files[1]) - 1
    assert main(["run", str(c), "--dry-run", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["estimate"]["files"]) == int(files[1])
    assert not (tmp_path / "out").exists()


# -- config files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pipeline.conf", "pipeline", "c.yml", "c.txt"])
def test_a_config_with_any_other_suffix_is_yaml(tmp_path, llama_file, name):
    c = config(tmp_path / name, llama_file, "out.safetensors")
    reference = config(tmp_path / "reference.yaml", llama_file, "out.safetensors")
    assert load_config(c).pipeline().spec() == load_config(reference).pipeline().spec()
    assert main(["run", str(c), "--no-progress"]) == 0
    assert "model.layers.1.self_attn.qkv_proj.weight" in load_file(tmp_path / "out.safetensors")


def test_expect_paths_are_relative_to_the_config(tmp_path, llama_file, monkeypatch):
    (tmp_path / "cfg").mkdir()
    save_file({"lm_head.weight": torch.zeros(256, 64), "extra": torch.zeros(1)}, tmp_path / "cfg" / "spec.safetensors")
    c = config(tmp_path / "cfg" / "c.yaml", llama_file, "out.safetensors", extra="expect: spec.safetensors\n", steps="")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    loaded = load_config(c)
    assert loaded.expect == str(tmp_path / "cfg" / "spec.safetensors")
    plan = sb.plan(loaded.source, loaded.pipeline(), **loaded.options(sb.PlanOptions))
    assert any(f.check == "no_missing" and "extra" in f.message for f in plan.findings)


def test_step_path_parameters_are_relative_to_the_config(tmp_path, llama_file, monkeypatch):
    (tmp_path / "cfg").mkdir()
    save_file({"lm_head.weight": torch.zeros(100, 64)}, tmp_path / "cfg" / "like.safetensors")
    steps = "  - adapt_shapes: {strategy: slice, like: like.safetensors, pattern: lm_head.weight}\n"
    c = config(tmp_path / "cfg" / "c.yaml", llama_file, "out.safetensors", steps=steps)
    monkeypatch.chdir(tmp_path)  # not the config's folder
    loaded = load_config(c)
    assert sb.plan(loaded.source, loaded.pipeline()).outputs["lm_head.weight"].shape == (100, 64)


def test_a_missing_checkpoint_named_inside_a_step_is_one_line_naming_it(tmp_path, llama_file, capsys):
    """errors.md: bad input gets one line naming the file, never a traceback; here the file is a step's ``like:``."""
    steps = f"  - adapt_shapes: {{strategy: slice, like: {tmp_path / 'absent.safetensors'}}}\n"
    c = config(tmp_path / "c.yaml", llama_file, "out.safetensors", steps=steps)
    assert main(["run", str(c), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"statebridge: error: steps[0] (adapt_shapes): {tmp_path / 'absent.safetensors'}: no such file or folder"


def test_require_expect_list_metadata_and_format_in_a_config(tmp_path, llama_file, capsys):
    keys = [k for k in sb.plan(llama_file, [sb.Concat(**QKV)]).outputs]
    extra = f"format: gguf\nmetadata: {{origin: promises}}\nrequire: {{no_missing: true, no_extra: true}}\nexpect: {json.dumps(keys[:-1])}\n"
    c = config(tmp_path / "c.yaml", llama_file, "out.bin", extra=extra)  # format beats the suffix (.bin: torch)
    assert main(["run", str(c), "--no-progress"]) == 2
    assert f"error (no_extra): 1 produced keys are not in the target spec: {keys[-1]}" in capsys.readouterr().err
    c.write_text(c.read_text().replace(json.dumps(keys[:-1]), json.dumps(keys)))
    assert main(["run", str(c), "--no-progress"]) == 0
    fields = gguf.GGUFReader(tmp_path / "out.bin").fields
    assert fields["origin"].contents() == "promises" and fields["general.architecture"].contents() == "statebridge"


@pytest.mark.parametrize("spelling", ["match_shapes", "match_dtypes"])
def test_match_shapes_and_dtypes_false_turn_differences_into_warnings(tmp_path, spelling, capsys):
    state = {"w": torch.zeros(2, 3)}
    spec = {"w": torch.zeros(3, 3) if spelling == "match_shapes" else torch.zeros(2, 3, dtype=torch.float16)}
    with pytest.raises(sb.PlanError, match=f"error \\({spelling}\\)"):
        sb.plan(state, None, expect=torch.nn.ParameterDict({"w": torch.nn.Parameter(spec["w"])}))
    plan = sb.plan(state, None, expect=torch.nn.ParameterDict({"w": torch.nn.Parameter(spec["w"])}), require={spelling: False})
    assert [(f.level, f.check) for f in plan.findings if f.check == spelling] == [("warning", spelling)]
    save_file(state, tmp_path / "s.safetensors")
    save_file(spec, tmp_path / "spec.safetensors")
    c = config(tmp_path / "c.yaml", "s.safetensors", "out.safetensors", steps="")
    assert main(["run", str(c), "--no-progress", "--expect", str(tmp_path / "spec.safetensors")]) == 2
    assert main(["run", str(c), "--no-progress", "--expect", str(tmp_path / "spec.safetensors"), "--require", f"{spelling}=false"]) == 0
    assert f"warning ({spelling})" in capsys.readouterr().out


# -- patterns and dtypes ------------------------------------------------------------------------------


def test_regex_targets_take_numbered_and_named_groups(llama_sd):
    named = sb.plan(llama_sd, [sb.Rename(pattern=r"re:^model\.layers\.(?P<n>\d+)\.", to=r"blocks.\g<n>.")]).outputs
    numbered = sb.plan(llama_sd, [sb.Rename(pattern=r"re:^model\.layers\.(\d+)\.", to=r"blocks.\1.")]).outputs
    assert list(named) == list(numbered)
    assert "blocks.1.self_attn.q_proj.weight" in named and "model.layers.1.self_attn.q_proj.weight" not in named
    with pytest.raises(sb.PlanError, match="does not fit pattern"):
        sb.plan(llama_sd, [sb.Rename(pattern=r"re:^model\.layers\.(?P<n>\d+)\.", to=r"blocks.\g<m>.")])


def test_regex_renames_substitute_every_match_inside_keys_like_re_sub(llama_sd):
    out = sb.plan(llama_sd, [sb.Rename(pattern=r"re:_proj|\.weight$", to="")]).outputs
    assert "model.layers.0.self_attn.q" in out and "model.layers.0.mlp.gate" in out and "lm_head" in out


@pytest.mark.parametrize(
    ("spellings", "name"),
    [(["float16", "fp16", "half", "F16"], "float16"), (["bfloat16", "bf16", "BF16"], "bfloat16"), (["float32", "fp32", "F32"], "float32"), (["int64", "I64"], "int64")],
)
def test_dtype_spellings(spellings, name):
    assert {sb.Cast(dtype=s).params.dtype for s in spellings} == {name}


@pytest.mark.parametrize(
    ("step", "name"),
    [
        (sb.ValueOp(pattern="w", op="zero"), "value_op"),
        (sb.AdaptShapes(strategy="slice", shapes={"w": [1, 3]}), "adapt_shapes"),
        (sb.Drop(keys=["w"]), "drop"),
        (sb.Cast(dtype="fp16"), "cast"),
    ],
)
def test_lossy_steps_have_no_inverse_and_the_error_names_the_step(step, name):
    pipeline = sb.Pipeline([sb.Rename(mapping={"v": "u"}), step])
    with pytest.raises(sb.NotInvertibleError, match=rf"steps\[1\] \({name}\)"):
        pipeline.inverse({"w": sb.TensorMeta((2, 3), "float32"), "v": sb.TensorMeta((1,), "float32")})


# -- writers and shards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_suffixes_choose_the_torch_writer(tmp_path, llama_file, llama_sd, suffix):
    sb.run(llama_file, None, tmp_path / f"out{suffix}", progress=False)
    loaded = torch.load(tmp_path / f"out{suffix}", weights_only=True, mmap=True)
    assert loaded.keys() == llama_sd.keys() and all(torch.equal(loaded[k], v) for k, v in llama_sd.items())


def test_a_tensor_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    state = {"big1": torch.zeros(1000), "s1": torch.zeros(25), "s2": torch.zeros(25), "big2": torch.zeros(1000), "s3": torch.zeros(25)}
    sb.run(state, None, tmp_path / "out", shard_size=1000, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    by_shard: dict[str, list[str]] = {}
    for key, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(key)
    assert list(by_shard.values()) == [["big1"], ["s1", "s2"], ["big2"], ["s3"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*by_shard, "model.safetensors.index.json"])  # no empty shard
    assert list(by_shard) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def test_counts_show_overwritten_only_when_there_are_some():
    state = {"a": torch.zeros(2), "b": torch.ones(2)}
    assert "overwritten" not in sb.plan(state, None).counts()
    plan = sb.plan(state, [sb.Rename(mapping={"a": "w", "b": "w"})], on_collision="warn")
    assert plan.counts()["overwritten"] == 1 and "1 overwritten" in plan.render()


# -- loading into modules -----------------------------------------------------------------------------


def test_load_into_with_strict_false_allows_missing_keys_and_loads_the_rest():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias.fill_(7.0)
    source = {"weight": torch.ones(2, 3)}
    with pytest.raises(sb.PlanError, match="1 module keys the pipeline does not produce: bias"):
        sb.load_into(model, source)
    assert torch.equal(model.bias.detach(), torch.full((2,), 7.0))
    sb.load_into(model, source, strict=False)
    assert torch.equal(model.weight.detach(), torch.ones(2, 3)) and torch.equal(model.bias.detach(), torch.full((2,), 7.0))
    with pytest.warns(RuntimeWarning, match="1 keys the module does not have were not loaded: extra"):
        sb.load_into(model, {**source, "extra": torch.zeros(1)}, strict=False)  # unexpected keys: loaded around, named
    with pytest.raises(sb.PlanError, match="1 keys the module does not have: extra"):
        sb.load_into(model, {**source, "extra": torch.zeros(1)})


# -- gates and alignment ------------------------------------------------------------------------------


def test_the_finite_gate_checks_computed_tensors_and_not_renamed_ones(tmp_path):
    """config.md, Gates: tensors that are only renamed are copied as bytes and not gated."""
    save_file({"nan": torch.tensor([float("nan"), 1.0]), "ok": torch.ones(2)}, tmp_path / "s.safetensors")
    sb.run(tmp_path / "s.safetensors", [sb.Rename(mapping={"nan": "still_nan"})], tmp_path / "renamed.safetensors", gates={"finite": True}, progress=False)
    assert torch.isnan(load_file(tmp_path / "renamed.safetensors")["still_nan"][0])
    with pytest.raises(sb.GateRejectedError, match="'nan': every candidate was rejected"):
        sb.run(tmp_path / "s.safetensors", [sb.Cast(dtype="fp16")], tmp_path / "cast.safetensors", gates={"finite": True}, progress=False)
    assert not (tmp_path / "cast.safetensors").exists()


def test_raw_copied_tensors_keep_their_offset_within_a_page(tmp_path, llama_file):
    """scale.md, Raw copies: the header is padded so raw-copied tensors sit at their source's offset within a page."""
    import mmap
    import struct

    def offsets(path: Path) -> dict[str, int]:
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        header.pop("__metadata__")
        return {k: 8 + length + v["data_offsets"][0] for k, v in header.items()}

    sb.run(llama_file, [sb.Rename(pattern="model.**", to="**")], tmp_path / "out.safetensors", metadata={"a": "x" * 333}, progress=False)
    source, out = offsets(llama_file), offsets(tmp_path / "out.safetensors")
    assert {k.removeprefix("model."): v % mmap.PAGESIZE for k, v in source.items()} == {k: v % mmap.PAGESIZE for k, v in out.items()}
