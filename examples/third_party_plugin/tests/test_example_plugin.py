"""The example third-party plugin: discovered, registered, planned, computed and checked."""

from pathlib import Path

import pytest
import torch

import statebridge as sb
from statebridge.plugins import installed
from statebridge.testing import assert_plugin_loads, run_cli
from statebridge_example_scale.transforms import ScaleByName

STATE = {
    "layers.0.mlp.weight": torch.ones(2, 3, dtype=torch.bfloat16),
    "layers.1.mlp.weight": torch.full((2, 3), 2.0),
    "layers.0.norm.weight": torch.ones(3),
    "position_ids": torch.arange(4),
}


def test_discovered_through_its_entry_point_with_its_transform_and_command() -> None:
    plugin = assert_plugin_loads("example_scale", "statebridge-example-scale")
    assert plugin.provides == {"transforms": ["scale_by_name"], "commands": ["scale-factors"]}
    assert plugin.hooks == ["register_commands", "register_transforms", "validate_plan"]


def test_registered_under_its_config_name() -> None:
    transforms = installed().transforms
    assert transforms.get("scale_by_name") is ScaleByName
    assert str(transforms.owner("scale_by_name")) == "statebridge-example-scale 0.1.0"
    step = transforms.build({"scale_by_name": {"pattern": "layers.*.mlp.weight", "factor": 0.5}})
    assert isinstance(step, ScaleByName) and step.params.factor == 0.5


def test_plan_declares_groups_then_computes() -> None:
    metas = {k: sb.TensorMeta.of(v) for k, v in STATE.items()}
    groups = ScaleByName(pattern="layers.*.mlp.weight", factor=0.5).plan(metas)
    assert [g.inputs for g in groups] == [("layers.0.mlp.weight",), ("layers.1.mlp.weight",)]
    assert all(dict(g.outputs) == {g.inputs[0]: metas[g.inputs[0]]} for g in groups)  # same name, shape, dtype
    out = {k: v for g in groups for k, v in g.compute({k: STATE[k] for k in g.inputs}).items()}
    assert out["layers.0.mlp.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out["layers.0.mlp.weight"], torch.full((2, 3), 0.5, dtype=torch.bfloat16))
    torch.testing.assert_close(out["layers.1.mlp.weight"], torch.ones(2, 3))


def test_rejects_integer_tensors_and_missing_keys_before_reading_data() -> None:
    metas = {k: sb.TensorMeta.of(v) for k, v in STATE.items()}
    with pytest.raises(sb.PlanError, match="not floating point"):
        ScaleByName(pattern="position_ids", factor=2).plan(metas)
    with pytest.raises(sb.PlanError):
        ScaleByName(pattern="decoder.*.weight", factor=2).plan(metas)
    assert ScaleByName(pattern="decoder.*.weight", factor=2, strict=False).plan(metas) == []


def _own_findings(steps) -> list:
    return [f for f in sb.plan(STATE, steps).findings if f.check == "example_scale.zero_factor"]


def test_validate_warns_about_a_zero_factor() -> None:
    zero = ScaleByName(pattern="layers.*.norm.weight", factor=0)
    (finding,) = _own_findings([sb.Sequential([zero])])  # found inside nested steps
    assert finding.level == "warning" and "layers.*.norm.weight" in finding.message
    assert _own_findings([ScaleByName(pattern="layers.*.norm.weight", factor=3)]) == []


def test_its_command_lists_the_scale_steps_of_a_config(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a.w": torch.ones(2)}, tmp_path / "in.safetensors")
    config = tmp_path / "scale.yaml"
    config.write_text("source: in.safetensors\nsteps:\n  - scale_by_name: {pattern: 'a.*', factor: 0.5}\n")
    done = run_cli(["scale-factors", str(config)])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a.*: x0.5\n"
    assert "scale-factors" in run_cli(["--help"]).stdout
