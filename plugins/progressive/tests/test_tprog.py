"""The .tprog format: an exact round trip, a growth that records itself, one-line errors for a bad progressive.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import statebridge as sb
from statebridge.api import target_writer
from statebridge.testing import run_cli
from statebridge_progressive import tprog
from statebridge_progressive.depth import GrowDepth
from statebridge_progressive.ewc import EWC
from statebridge_progressive.width import GrowWidth

sys.path.insert(0, str(Path(__file__).parent))
from models import TOKENS, load, save  # noqa: E402

SCHEMA = Path(tprog.__file__).with_name("progressive.schema.json")


def fresh(config: dict) -> torch.nn.Module:
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = load(save("llama", tmp_path / "src", layers=2, tied=True))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer.json").write_text('{"model": {}}')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    scheduler.step()
    ewc = EWC.from_model(model, [(TOKENS[:, :4], None)], lam=50.0)
    torch.manual_seed(7)
    path = tprog.save(tmp_path / "m.tprog", model, model.config.to_dict(), family="tiny", tokenizer=tmp_path / "tok",
                      optimizer=optimizer, scheduler=scheduler, rng=True, ewc=ewc)
    expected_rng = torch.rand(3)

    back = tprog.read(path)
    assert back.meta.model_family == "tiny" and back.meta.current_size.num_layers == 2
    assert back.meta.ewc_config.stored and back.meta.ewc_config.lambda_ == 50.0
    again = fresh(back.config)
    back.load_into(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(again(TOKENS).logits, model.eval()(TOKENS).logits)
    restored = torch.optim.AdamW(again.parameters(), lr=1e-3)
    tprog.load_optimizer(back, restored)
    for a, b in zip(optimizer.state_dict()["state"].values(), restored.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.json("training/scheduler") == scheduler.state_dict()
    back.restore_rng()
    assert torch.equal(torch.rand(3), expected_rng)
    anchor = EWC.from_checkpoint(back)
    assert all(torch.equal(anchor.fisher[k], ewc.fisher[k]) for k in ewc.fisher)
    assert (path / "tokenizer/tokenizer.json").read_text() == '{"model": {}}'
    assert tprog.read_meta(path) == back.meta


@pytest.mark.parametrize("field,value,message", [
    ("current_size", {"hidden_size": "wide"}, "current_size.hidden_size: Input should be a valid integer"),
    ("format_version", "2.0.0", "format_version: String should match pattern"),
    ("expansion_history", [{"method": "x"}], "expansion_history.0.from_size: Field required"),
    ("surprise", 1, "surprise: Extra inputs are not permitted"),
])
def test_malformed_progressive_json_names_the_field(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = tprog.save(tmp_path / "m.tprog", {"w": torch.ones(2)}, {"model_type": "llama"})
    meta = json.loads((path / "progressive.json").read_text())
    meta[field] = value
    (path / "progressive.json").write_text(json.dumps(meta))
    with pytest.raises(sb.SourceError) as caught:
        tprog.read(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "progressive.json" in str(caught.value)


def test_growing_appends_to_the_history(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    model = load(src)
    start = tprog.save(tmp_path / "a.tprog", model, json.loads((src / "config.json").read_text()), family="tiny",
                       ewc=EWC.from_model(model, [(TOKENS[:, :3], None)]))
    deeper = tprog.grow(start, [GrowDepth(method="llama_pro", num_layers=3)], tmp_path / "b.tprog").target
    wider = tprog.grow(deeper, [GrowWidth(head_dim=16, factor=2)], tmp_path / "c.tprog").target
    meta = tprog.read_meta(wider)
    history = meta.expansion_history
    assert [h.method for h in history] == ["grow_depth(llama_pro)", "grow_width"]
    assert (history[0].from_size.num_layers, history[0].to_size.num_layers) == (2, 3)
    assert (history[1].from_size.hidden_size, history[1].to_size.hidden_size) == (64, 128)
    assert history[0].dropped == ["ewc/"] and not meta.ewc_config.stored and not (wider / "ewc").exists()
    assert meta.current_size.parameters == sum(p.numel() for p in fresh(tprog.read(wider).config).parameters())
    grown = fresh(tprog.read(wider).config)
    tprog.read(wider).load_into(grown)
    with torch.no_grad():
        assert float((grown(TOKENS).logits - model(TOKENS).logits).abs().max()) <= 1e-4


def test_command_line_grows_into_a_tprog(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    done = run_cli(["grow", "depth", str(src), str(tmp_path / "out.tprog"), "--method", "llama_pro", "--num-layers", "4"])
    assert done.returncode == 0, done.stderr
    meta = tprog.read_meta(tmp_path / "out.tprog")
    assert meta.model_family == "llama" and meta.expansion_history[0].to_size.num_layers == 4


def test_the_published_schema_is_current() -> None:
    assert json.loads(SCHEMA.read_text()) == tprog.json_schema()


def test_nothing_in_a_tprog_is_executed(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    path = tprog.save(tmp_path / "a.tprog", load(src), json.loads((src / "config.json").read_text()))
    witness = tmp_path / "executed"
    (path / "expansion_hooks.py").write_text(f"open({str(witness)!r}, 'w').close()\n")
    tprog.read(path).load_into(fresh(tprog.read(path).config))
    grown = tprog.grow(path, [GrowDepth(method="llama_pro", num_layers=3)], tmp_path / "b.tprog").target
    assert not witness.exists() and not (grown / "expansion_hooks.py").exists()


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_plain_run_records_the_growth_as_statebridge_grow_does(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    model = load(src)
    start = tprog.save(tmp_path / "a.tprog", model, json.loads((src / "config.json").read_text()), family="tiny",
                       ewc=EWC.from_model(model, [(TOKENS[:, :3], None)]))
    config = tmp_path / "grow.yaml"
    config.write_text("steps:\n  - grow_depth: {method: llama_pro, num_layers: 3}\n")
    runs = [run_cli(["run", str(config), "--source", str(start), "--target", str(tmp_path / name), "--no-progress"])
            for name in ("b.tprog", "c.tprog")]
    assert all(done.returncode == 0 for done in runs), runs[0].stderr
    assert "progressive.json edits:" in runs[0].stdout and "stale_metadata" not in runs[0].stdout + runs[0].stderr
    assert '    current_size.num_layers: 2 -> 3\n' in runs[0].stdout
    assert '    expansion_history[0]: null -> {"from_size": {' in runs[0].stdout  # the new entry, not the history twice
    assert tree(tmp_path / "b.tprog") == tree(tmp_path / "c.tprog")  # byte-identical from run to run

    grown = run_cli(["grow", "depth", str(start), str(tmp_path / "d.tprog"), "--method", "llama_pro", "--num-layers", "3"])
    assert grown.returncode == 0, grown.stderr
    plain, command = tprog.read_meta(tmp_path / "b.tprog"), tprog.read_meta(tmp_path / "d.tprog")
    assert len(plain.expansion_history) == 1 and plain == command  # the same entry, size, EWC and analyses
    assert plain.expansion_history[0].dropped == ["ewc/"] and plain.current_size.num_layers == 3
    assert (tmp_path / "b.tprog/progressive.json").read_bytes() == (tmp_path / "d.tprog/progressive.json").read_bytes()


def test_growth_steps_chain_their_entries_and_other_size_changes_still_warn(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    path = tprog.save(tmp_path / "a.tprog", load(src), json.loads((src / "config.json").read_text()))
    built = sb.plan(path, [GrowDepth(method="llama_pro", num_layers=3), GrowWidth(head_dim=16, factor=2)])
    history = tprog.ProgressiveMeta.model_validate(built.folder.edited("progressive.json")).expansion_history
    assert [(h.from_size.num_layers, h.to_size.num_layers, h.to_size.hidden_size) for h in history] == [(2, 3, 64), (3, 3, 128)]
    assert history[1].to_size.parameters == sum(m.numel for m in built.outputs.values())
    assert not [f for f in built.findings if f.check == "progressive.stale_metadata"]
    # inside a scope the step sees only the scope's tensors, yet the count is of the whole model
    scoped = sb.plan(path, [sb.Scope(prefix="model.", steps=[GrowDepth(method="llama_pro", num_layers=3)])])
    size = tprog.ProgressiveMeta.model_validate(scoped.folder.edited("progressive.json")).current_size
    assert size.parameters == sum(m.numel for m in scoped.outputs.values()) and size.num_layers == 3
    assert not [f for f in sb.plan(path, [sb.Cast(dtype="bf16")]).findings if f.check == "progressive.stale_metadata"]
    # a step that changes the size without recording it: progressive.json would describe the old model
    found = [f.message for f in sb.plan(path, [sb.Drop(keys=["model.layers.1.mlp.**"])]).findings
             if f.check == "progressive.stale_metadata"]
    assert len(found) == 1 and "current_size parameters 90432 (the result: " in found[0]


def test_a_malformed_progressive_json_stops_a_growth_plan_in_one_line(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    path = tprog.save(tmp_path / "a.tprog", load(src), json.loads((src / "config.json").read_text()))
    meta = json.loads((path / "progressive.json").read_text())
    meta["current_size"]["hidden_size"] = "wide"
    (path / "progressive.json").write_text(json.dumps(meta))
    with pytest.raises(sb.PlanError) as caught:
        sb.plan(path, [GrowDepth(method="llama_pro", num_layers=3)])
    assert "progressive.json: current_size.hidden_size: Input should be a valid integer" in str(caught.value)
    assert "\n" not in str(caught.value)

def test_a_plain_run_into_a_tprog_writes_a_tprog_with_the_tokenizer_and_the_stale_parts_left(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    model = load(src)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer.json").write_bytes(b'{"model": {"vocab": {"a": 0}}}\n')
    start = tprog.save(tmp_path / "a.tprog", model, json.loads((src / "config.json").read_text()), family="tiny",
                       tokenizer=tmp_path / "tok", ewc=EWC.from_model(model, [(TOKENS[:, :3], None)]), rng=True)
    config = tmp_path / "grow.yaml"
    config.write_text("steps:\n  - grow_depth: {method: llama_pro, num_layers: 3}\n")
    done = run_cli(["run", str(config), "--source", str(start), "--target", str(tmp_path / "b.tprog"), "--no-progress"])
    assert done.returncode == 0, done.stderr
    assert "sub-folders carried unchanged: tokenizer/" in done.stdout
    assert "ewc/ (holds the old shapes' parameters (the steps change them))" in done.stdout
    assert "training/ (holds the old shapes' parameters" in done.stdout
    grown = tprog.read(tmp_path / "b.tprog")  # opens: weights.safetensors, config.json, progressive.json
    assert sorted(p.name for p in grown.path.iterdir()) == ["config.json", "progressive.json", "tokenizer", "weights.safetensors"]
    assert (grown.path / "tokenizer/tokenizer.json").read_bytes() == (start / "tokenizer/tokenizer.json").read_bytes()
    assert grown.meta.expansion_history[0].dropped == ["training/", "ewc/"] and not grown.meta.ewc_config.stored

    command = run_cli(["grow", "depth", str(start), str(tmp_path / "d.tprog"), "--method", "llama_pro", "--num-layers", "3"])
    assert command.returncode == 0, command.stderr
    by_command = tprog.read(tmp_path / "d.tprog").weights()
    assert list(grown.weights()) == list(by_command)
    assert all(torch.equal(grown.weights()[k], by_command[k]) for k in by_command)
    assert tree(tmp_path / "b.tprog") == tree(tmp_path / "d.tprog")  # the command is this same run
    # the provenance lists the carried tokenizer files, so a later run may replace the target without overwrite
    sb.run(start, [GrowDepth(method="llama_pro", num_layers=3)], tmp_path / "b.tprog", progress=False)
    assert tree(tmp_path / "b.tprog") == tree(tmp_path / "d.tprog")

    # a run that keeps every shape keeps the training state and the EWC anchor, which still fit
    same = sb.run(start, [sb.Cast(dtype="fp32")], tmp_path / "e.tprog", progress=False)
    kept = tprog.read(same.target)
    assert kept.part("ewc/fisher") is not None and kept.part("training/rng") is not None and kept.meta.ewc_config.stored
    assert tree(start / "ewc") == tree(same.target / "ewc")
    assert not [f for f in same.plan.findings if f.check == "progressive.tprog"]
    # a shape change no growth step records leaves ewc/ and says that progressive.json still claims it
    moved = sb.plan(start, [sb.Transpose(pattern="lm_head.weight")])
    writer = target_writer(moved, tmp_path / "f.tprog")
    assert writer.folders == ("tokenizer/",) and "ewc/" in moved.folder.left
    assert [f.level for f in moved.findings if f.check == "progressive.tprog"] == ["warning"]


def test_a_run_into_a_tprog_from_a_model_folder_starts_its_history(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    (src / "README.md").write_text("a model\n")
    runs = [sb.run(src, [GrowDepth(method="llama_pro", num_layers=3)], tmp_path / name, progress=False)
            for name in ("b.tprog", "c.tprog")]
    grown = tprog.read(runs[0].target)
    assert grown.meta.model_family == "llama" and grown.config["num_hidden_layers"] == 3
    assert [(h.from_size.num_layers, h.to_size.num_layers) for h in grown.meta.expansion_history] == [(2, 3)]
    assert grown.meta.current_size.parameters == sum(t.numel() for t in grown.weights().values())
    assert not (runs[0].target / "README.md").exists()  # not part of a .tprog; the plan lists it
    assert any("README.md (not part of a .tprog)" in f.message for f in runs[0].plan.findings)
    assert tree(runs[0].target) == tree(runs[1].target)
    assert tree(runs[0].target) == tree(tprog.grow(src, [GrowDepth(method="llama_pro", num_layers=3)], tmp_path / "d.tprog").target)
    # a second run may replace the target it wrote (progressive.json included) without --overwrite
    sb.run(src, [GrowDepth(method="llama_pro", num_layers=3)], runs[0].target, progress=False)


def test_a_failed_run_into_a_tprog_leaves_the_target_untouched(tmp_path: Path) -> None:
    src = save("llama", tmp_path / "src", layers=2)
    path = tprog.save(tmp_path / "a.tprog", load(src), json.loads((src / "config.json").read_text()))
    target = tprog.grow(path, [GrowDepth(method="llama_pro", num_layers=3)], tmp_path / "b.tprog").target
    before = tree(target)
    with pytest.raises(sb.ConfigError) as caught:  # a bare safetensors file has no config.json: one line, nothing written
        sb.run(path / "weights.safetensors", [], target, progress=False, overwrite=True)
    assert "a .tprog needs the model's config.json" in str(caught.value) and "\n" not in str(caught.value)
    assert tree(target) == before
    nan = sb.ValueOp(pattern="model.norm.weight", op="fill", args={"value": float("nan")})
    with pytest.raises(sb.GateRejectedError):  # a failure mid-run, after the weights were laid out in staging
        sb.run(path, [GrowDepth(method="llama_pro", num_layers=3), nan], target, gates={"finite": True}, overwrite=True, progress=False)
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tprog", "b.tprog", "src"]
