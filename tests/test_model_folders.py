"""Model folders in, model folders out: companion files carried, config.json edited, all in one commit.

The material is real: a tiny Llama saved by ``transformers``' ``save_pretrained`` with a
tokenizer trained offline by the ``tokenizers`` library, a generation config and a chat
template, and a LoRA adapter saved by ``peft``.  Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import statebridge as sb
from statebridge import GateRejectedError, PlanError, SourceError
from statebridge.cli import main
from statebridge.transforms.base import Params
from statebridge.transforms.rename import Drop

VOCABULARY = ["[UNK]", "<s>", "</s>", "[PAD]"]
COMPANIONS = ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A 2-layer Llama saved with save_pretrained, with a WordLevel tokenizer, generation config and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ran"], trainers.WordLevelTrainer(special_tokens=VOCABULARY))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="[PAD]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, max_new_tokens=5)
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*COMPANIONS, "model.safetensors"])
    return folder


@pytest.fixture(scope="module")
def adapter_folder(hf_folder, tmp_path_factory) -> Path:
    """A LoRA adapter of that Llama, saved by peft (adapter_config.json, adapter_model.safetensors, README.md)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(hf_folder), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(folder)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    return folder


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def config_file(tmp_path: Path, source: Path, target: Path, steps: str) -> Path:
    path = tmp_path / "convert.yaml"
    path.write_text(f"source: {source}\ntarget: {target}\nsteps:\n{steps}")
    return path


def test_a_transformers_folder_cast_to_bf16_by_the_cli_loads_with_from_pretrained(hf_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    before = tree(hf_folder)
    target = tmp_path / "tiny-llama-bf16"
    config = config_file(tmp_path, hf_folder, target, "  - cast: {dtype: bf16}\n")

    assert main(["plan", str(config)]) == 0
    shown = capsys.readouterr().out
    assert 'config.json edits:\n    dtype: "float32" -> "bfloat16"' in shown
    assert "5 companion files, written into the target folder" in shown
    assert main(["run", str(config), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert 'dtype: "float32" -> "bfloat16"' in dry and "tokenizer.json" in dry and not target.exists()

    assert main(["run", str(config), "--no-progress"]) == 0
    assert "in 6 files" in capsys.readouterr().out
    assert sorted(p.name for p in target.iterdir()) == sorted([*COMPANIONS, "model.safetensors"])
    assert tree(hf_folder) == before  # the source is untouched

    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
    original = load_file(hf_folder / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key].to(torch.bfloat16)), key

    # config.json: the same keys in the same order, only the dtype changed, indented as transformers does
    old, new = json.loads((hf_folder / "config.json").read_text()), json.loads((target / "config.json").read_text())
    assert list(new) == list(old) and {k for k in old if old[k] != new[k]} == {"dtype"}
    assert (target / "config.json").read_text() == json.dumps(new, indent=2) + "\n"
    for name in COMPANIONS:
        if name != "config.json":
            assert (target / name).read_bytes() == (hf_folder / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer("the cat sat")["input_ids"] == AutoTokenizer.from_pretrained(hf_folder)("the cat sat")["input_ids"]
    assert tokenizer.chat_template.startswith("{% for m in messages %}")
    assert GenerationConfig.from_pretrained(target).max_new_tokens == 5


def test_the_config_edits_are_part_of_the_fingerprint_and_of_the_json_plan(hf_folder):
    cast, rename = [sb.Cast(dtype="bf16")], [sb.Rename(pattern="lm_head.weight", to="lm_head.weight")]
    folder_cast, file_cast = sb.plan(hf_folder, cast), sb.plan(hf_folder / "model.safetensors", cast)
    assert folder_cast.folder.edits == {"dtype": "bfloat16"} and file_cast.folder is None
    assert folder_cast.fingerprint != file_cast.fingerprint  # same steps, but only one edits a config.json
    assert sb.plan(hf_folder, rename).fingerprint == sb.plan(hf_folder / "model.safetensors", rename).fingerprint
    data = json.loads(json.dumps(folder_cast.to_dict()))
    assert data["model_folder"]["config_edits"] == {"dtype": {"from": "float32", "to": "bfloat16"}}
    assert data["model_folder"]["companions"] == COMPANIONS


def test_runs_from_a_model_folder_are_byte_identical(hf_folder, tmp_path):
    first = sb.run(hf_folder, [sb.Cast(dtype="bf16")], tmp_path / "a")
    second = sb.run(hf_folder, [sb.Cast(dtype="bf16")], tmp_path / "b")
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert first.plan.fingerprint == second.plan.fingerprint
    assert sorted(f.name for f in first.files) == sorted([*COMPANIONS, "model.safetensors"])


def test_a_peft_adapter_folder_keeps_its_config_and_its_file_name(adapter_folder, hf_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    renamed = tmp_path / "renamed"
    report = sb.run(adapter_folder, [sb.Rename(pattern="**.lora_A.weight", to="**.lora_down.weight")], renamed)
    assert (renamed / "adapter_config.json").read_bytes() == (adapter_folder / "adapter_config.json").read_bytes()
    assert report.plan.folder.adapter and not report.plan.folder.edits  # no config.json: nothing to edit
    with safe_open(renamed / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_A" not in k for k in keys) and any(k.endswith("lora_down.weight") for k in keys)
    assert sorted(p.name for p in renamed.iterdir()) == sorted(p.name for p in adapter_folder.iterdir())

    # read and written the same way: a cast adapter loads with peft, its weights the cast originals
    cast = tmp_path / "adapter-bf16"
    sb.run(adapter_folder, [sb.Cast(dtype="bf16")], cast)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_folder), cast)
    original = load_file(adapter_folder / "adapter_model.safetensors")
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(lora) == len(original)
    for key, value in original.items():
        assert torch.equal(lora[key.replace(".weight", ".default.weight")], value.to(torch.bfloat16).to(value.dtype)), key


def test_a_single_file_target_gets_no_companions_and_the_plan_says_so(hf_folder, tmp_path, capsys):
    target = tmp_path / "out" / "model.safetensors"
    config = config_file(tmp_path, hf_folder, target, "  - cast: {dtype: bf16}\n")
    assert main(["run", str(config), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "is a single file: the model folder's 5 companion files and its config.json edits are not written" in shown
    assert "not written: the target is a single file" in shown
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_a_failed_run_leaves_no_companion_files_behind(hf_folder, tmp_path):
    steps = [sb.ValueOp(pattern="model.norm.weight", op="fill", args={"value": float("nan")})]
    with pytest.raises(GateRejectedError):
        sb.run(hf_folder, steps, tmp_path / "out", gates={"finite": True})
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # no target, no staging folder


def test_a_companion_that_vanishes_before_the_run_fails_it_and_leaves_no_target(hf_folder, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(hf_folder, source)
    planned = sb.plan(source, [sb.Cast(dtype="bf16")])
    (source / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match=r"tokenizer\.json: cannot carry this companion file"):
        sb.run(planned, None, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_vocabulary_change_warns_that_the_tokenizer_and_config_are_stale(hf_folder):
    grow = sb.AdaptShapes(strategy="pad", shapes={"model.embed_tokens.weight": [16, 16], "lm_head.weight": [16, 16]})
    warnings = [f for f in sb.plan(hf_folder, [grow]).findings if f.level == "warning" and f.check == "core.model_folder"]
    assert len(warnings) == 1
    message = warnings[0].message
    assert "vocabulary of 12 tokens" in message and "float32[16, 16]" in message
    assert "config.json (vocab_size 12), tokenizer.json, tokenizer_config.json still describe the old one" in message
    assert not [f for f in sb.plan(hf_folder, [sb.Cast(dtype="bf16")]).findings if f.level == "warning"]


class DropLastLayer(Drop):
    """Drops the last layer and, unless ``silent``, says so in config.json (a depth change, as a plugin would)."""

    name = "test.drop_last_layer"
    silent = False

    def config_edits(self, metas: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        return {} if self.silent else {"num_hidden_layers": config["num_hidden_layers"] - 1}


def test_a_depth_change_declares_its_config_edit_and_the_result_loads(hf_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    step = DropLastLayer(keys=["model.layers.1.**"])
    report = sb.run(hf_folder, [step], tmp_path / "shallow")
    assert report.plan.folder.changes() == [("num_hidden_layers", 2, 1)]
    assert "num_hidden_layers: 2 -> 1" in report.plan.render()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1

    silent = DropLastLayer(keys=["model.layers.1.**"])
    silent.silent = True
    findings = [str(f) for f in sb.plan(hf_folder, [silent]).findings if f.level == "warning"]
    assert findings == [
        "warning (core.model_folder): the result has 1 numbered layers, but config.json still says num_hidden_layers 2; "
        "no step edits it (a depth-changing transform declares that edit in config_edits)"
    ]


class SetConfig(sb.Transform):
    """Edits one config.json key; plans no group."""

    name = "test.set_config"

    class Params(Params):
        key: str
        value: Any

    def plan(self, metas):
        return []

    def config_edits(self, metas, config):
        return {self.params.key: self.params.value}


META = {"model.a": sb.TensorMeta((2, 2), "float32"), "model.b": sb.TensorMeta((2,), "float32"), "head": sb.TensorMeta((2, 2), "float32")}


def test_composites_combine_their_steps_edits():
    config = {"dtype": "float32", "num_hidden_layers": 2}
    assert sb.Pipeline([sb.Cast(dtype="bf16"), sb.Cast(dtype="fp16")]).config_edits(META, config) == {"dtype": "float16"}
    assert sb.Pipeline([SetConfig(key="a", value=1), SetConfig(key="a", value=2)]).config_edits(META, config) == {"a": 2}
    assert sb.Parallel([SetConfig(key="a", value=1), SetConfig(key="b", value=2)]).config_edits(META, config) == {"a": 1, "b": 2}
    with pytest.raises(PlanError, match=r"parallel steps \[0\] and \[1\] both edit config.json's 'a', differently"):
        sb.Parallel([SetConfig(key="a", value=1), SetConfig(key="a", value=2)]).config_edits(META, config)
    # a scope's steps see the scope's tensors: a cast of all of them covers the scope
    assert sb.Scope(prefix="model.", steps=[sb.Cast(dtype="bf16")]).config_edits(META, config) == {"dtype": "bfloat16"}
    assert sb.Scope(prefix="model.", steps=[sb.Cast(pattern="a", dtype="bf16")]).config_edits(META, config) == {}
    # a cast that leaves a floating tensor in another dtype says nothing
    assert sb.Cast(pattern="model.**", dtype="bf16").config_edits(META, config) == {}


def test_a_cast_edits_every_dtype_key_in_place_and_adds_one_where_none_is():
    cast = sb.Cast(dtype="bf16")
    nested = {"torch_dtype": "float32", "text_config": {"hidden_size": 4, "dtype": "float32", "vocab_size": 9}, "x": 1}
    edits = cast.config_edits(META, nested)
    assert edits == {"torch_dtype": "bfloat16", "text_config": {"hidden_size": 4, "dtype": "bfloat16", "vocab_size": 9}}
    assert list(edits["text_config"]) == ["hidden_size", "dtype", "vocab_size"]
    assert cast.config_edits(META, {"model_type": "llama"}) == {"torch_dtype": "bfloat16"}


def test_planning_a_model_folder_never_imports_torch(hf_folder, tmp_path):
    config = config_file(tmp_path, hf_folder, tmp_path / "never", "  - cast: {dtype: bf16}\n")
    for args in (["plan", str(config)], ["run", str(config), "--dry-run"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "statebridge", *args], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "statebridge.planning.folder" in modules and "torch" not in modules, args
        assert 'dtype: "float32" -> "bfloat16"' in done.stdout
    assert not (tmp_path / "never").exists()


def test_two_torchrun_processes_write_the_companions_once_and_as_one_process_does(hf_folder, tmp_path):
    config = config_file(tmp_path, hf_folder, tmp_path / "one", "  - cast: {dtype: bf16}\n")
    one = subprocess.run([sys.executable, "-m", "statebridge", "run", str(config), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "statebridge", "run", str(config), "--target", str(tmp_path / "two"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert sorted(tree(tmp_path / "one")) == sorted([*COMPANIONS, "model.safetensors"])


class SetGeneration(sb.Transform):
    """Edits generation_config.json, as a plugin edits the JSON file it owns: top-level key -> value, planning no group."""

    name = "test.set_generation"

    class Params(Params):
        values: dict[str, Any]

    def plan(self, metas):
        return []

    def companion_edits(self, metas, companions):
        edits = super().companion_edits(metas, companions)
        if companions.read("generation_config.json") is None:
            return edits
        return {**edits, "generation_config.json": dict(self.params.values)}


def test_a_step_edits_another_json_companion_planned_fingerprinted_and_written_in_the_commit(hf_folder, tmp_path):
    step = SetGeneration(values={"max_new_tokens": 7})
    built = sb.plan(hf_folder, [step])
    assert built.folder.file_edits == {"generation_config.json": {"max_new_tokens": 7}} and not built.folder.edits
    assert "tokenizer.json" not in built.folder.documents  # only the files a step asks for are parsed
    assert "generation_config.json (edited)" in built.render()
    assert "  generation_config.json edits:\n    max_new_tokens: 5 -> 7" in built.render()
    shown = json.loads(json.dumps(built.to_dict()))["model_folder"]
    assert shown["companion_edits"] == {"generation_config.json": {"max_new_tokens": {"from": 5, "to": 7}}}
    assert shown["config_edits"] == {}
    # the edit is part of what identifies the run: another value, or none, is another fingerprint
    prints = {built.fingerprint, sb.plan(hf_folder, [SetGeneration(values={"max_new_tokens": 9})]).fingerprint,
              sb.plan(hf_folder, [SetGeneration(values={"max_new_tokens": 5})]).fingerprint}
    assert len(prints) == 3
    assert sb.plan(hf_folder, [SetGeneration(values={"max_new_tokens": 5})]).folder.file_edits == {}  # no change, no edit

    report = sb.run(built, None, tmp_path / "out")
    written = tmp_path / "out" / "generation_config.json"
    old = json.loads((hf_folder / "generation_config.json").read_text())
    assert json.loads(written.read_text()) == {**old, "max_new_tokens": 7} and list(json.loads(written.read_text())) == list(old)
    planned = {f.name: f.nbytes for f in built.folder.planned_files()}
    assert planned["generation_config.json"] == written.stat().st_size
    for name in COMPANIONS:
        if name != "generation_config.json":
            assert (tmp_path / "out" / name).read_bytes() == (hf_folder / name).read_bytes(), name
    assert written in report.files
    sb.run(hf_folder, [step], tmp_path / "again")
    assert tree(tmp_path / "out") == tree(tmp_path / "again")  # byte-identical from run to run

    # a run that fails leaves the existing target as it was: the edited file is committed with the tensors or not at all
    before = tree(tmp_path / "out")
    nan = sb.ValueOp(pattern="model.norm.weight", op="fill", args={"value": float("nan")})
    with pytest.raises(GateRejectedError):
        sb.run(hf_folder, [SetGeneration(values={"max_new_tokens": 11}), nan], tmp_path / "out", gates={"finite": True}, overwrite=True)
    assert tree(tmp_path / "out") == before


def test_composites_thread_companion_edits_and_a_missing_file_is_an_error(hf_folder):
    docs = sb.Companions.of({"generation_config.json": {"max_new_tokens": 5, "eos_token_id": 2}})

    class Double(SetGeneration):
        def companion_edits(self, metas, companions):
            return {"generation_config.json": {"max_new_tokens": companions.read("generation_config.json")["max_new_tokens"] * 2}}

    # in sequence each step sees the file as the ones before it left it
    assert sb.Pipeline([Double(values={}), Double(values={})]).companion_edits(META, docs) == {"generation_config.json": {"max_new_tokens": 20}}
    with pytest.raises(PlanError, match=r"parallel steps \[0\] and \[1\] both edit generation_config.json's 'a', differently"):
        sb.Parallel([SetGeneration(values={"a": 1}), SetGeneration(values={"a": 2})]).companion_edits(META, docs)
    assert sb.Scope(prefix="model.", steps=[Double(values={})]).companion_edits(META, docs) == {"generation_config.json": {"max_new_tokens": 10}}

    class Stray(SetGeneration):
        def companion_edits(self, metas, companions):
            return {"progressive.json": {"x": 1}}

    with pytest.raises(PlanError, match=r"a step edits progressive.json, which .*tiny-llama does not have"):
        sb.plan(hf_folder, [Stray(values={})])


def test_a_writer_that_names_sub_folders_gets_them_carried_and_the_plan_says_what_is_left(hf_folder, tmp_path):
    from statebridge.trust.companions import fit_target
    from statebridge.writers.safetensors import SafetensorsWriter

    class Carrying(SafetensorsWriter):
        """A folder format that keeps ``extra/`` (``Writer.folders``), as a ``.tprog`` keeps ``tokenizer/``."""

        def __init__(self, path, **options):
            super().__init__(path, **options)
            self.folders = ("extra",)

    source = tmp_path / "source"
    shutil.copytree(hf_folder, source)
    (source / "extra/deep").mkdir(parents=True)
    (source / "extra/a.txt").write_bytes(b"a\x00b")
    (source / "extra/deep/b.json").write_text("{}")
    (source / "extra/.hidden").write_text("x")
    (source / "cache").mkdir()
    (source / "cache/c.bin").write_text("c")
    planned = sb.plan(source, [sb.Cast(dtype="bf16")])
    assert planned.folder.left == {"cache/": "a folder", "extra/": "a folder"} and not planned.folder.folders

    target = tmp_path / "out"
    writer = Carrying(target)
    fit_target(planned, writer)
    assert planned.folder.folders == ["extra/"] and list(planned.folder.left) == ["cache/"]
    assert "  sub-folders carried unchanged: extra/" in planned.render()
    assert [f.message for f in planned.findings if f.check == "core.model_folder.left"] == ["not carried from the model folder: cache/ (a folder)"]
    assert {"extra/a.txt", "extra/deep/b.json", "config.json"} <= set(planned.folder.carried_names())
    assert "extra/.hidden" not in planned.folder.carried_names()

    sb.run(planned, None, target, writer=writer, progress=False)
    assert (target / "extra/a.txt").read_bytes() == b"a\x00b" and (target / "extra/deep/b.json").read_text() == "{}"
    assert not (target / "cache").exists() and not (target / "extra/.hidden").exists()

    fit_target(planned, SafetensorsWriter(tmp_path / "plain"))  # a plan that meets a second writer: extra/ is left again
    assert not planned.folder.folders and list(planned.folder.left) == ["cache/", "extra/"]
    assert [f.message for f in planned.findings if f.check == "core.model_folder.left"] == [
        "not carried from the model folder: cache/ (a folder), extra/ (a folder)"]
