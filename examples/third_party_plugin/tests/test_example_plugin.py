"""The example third-party plugin: discovered, registered, planned, computed and checked."""

import re
from importlib.metadata import entry_points

import pytest
import torch

from statebridge.checks import validate
from statebridge.errors import PlanError
from statebridge.io.memory import DictSource
from statebridge.meta import TensorMeta
from statebridge.plan import Plan
from statebridge.plugins import registry
from statebridge.transforms import Pipeline
from statebridge_example_scale.plugin import ScaleByName

STATE = {
    "layers.0.mlp.weight": torch.ones(2, 3, dtype=torch.bfloat16),
    "layers.1.mlp.weight": torch.full((2, 3), 2.0),
    "layers.0.norm.weight": torch.ones(3),
    "position_ids": torch.arange(4),
}


def test_discovered_through_its_entry_point() -> None:
    (ep,) = [e for e in entry_points(group="statebridge") if e.name == "example_scale"]
    assert re.sub(r"[-_.]+", "-", ep.dist.name).lower() == "statebridge-example-scale"
    assert ep.value == "statebridge_example_scale.plugin"


def test_registered_under_its_config_name() -> None:
    assert registry().get("scale_by_name") is ScaleByName
    step = registry().build({"scale_by_name": {"pattern": "layers.*.mlp.weight", "factor": 0.5}})
    assert isinstance(step, ScaleByName) and step.params.factor == 0.5


def test_plan_declares_groups_then_computes() -> None:
    metas = {k: TensorMeta.of(v) for k, v in STATE.items()}
    groups = ScaleByName(pattern="layers.*.mlp.weight", factor=0.5).plan(metas)
    assert [g.inputs for g in groups] == [("layers.0.mlp.weight",), ("layers.1.mlp.weight",)]
    assert all(dict(g.outputs) == {g.inputs[0]: metas[g.inputs[0]]} for g in groups)  # same name, shape, dtype
    out = {k: v for g in groups for k, v in g.compute({k: STATE[k] for k in g.inputs}).items()}
    assert out["layers.0.mlp.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out["layers.0.mlp.weight"], torch.full((2, 3), 0.5, dtype=torch.bfloat16))
    torch.testing.assert_close(out["layers.1.mlp.weight"], torch.ones(2, 3))


def test_rejects_integer_tensors_and_missing_keys_before_reading_data() -> None:
    metas = {k: TensorMeta.of(v) for k, v in STATE.items()}
    with pytest.raises(PlanError, match="not floating point"):
        ScaleByName(pattern="position_ids", factor=2).plan(metas)
    with pytest.raises(PlanError):
        ScaleByName(pattern="decoder.*.weight", factor=2).plan(metas)
    assert ScaleByName(pattern="decoder.*.weight", factor=2, strict=False).plan(metas) == []


def _own_findings(plan: Plan) -> list:
    return [f for f in validate(plan) if f.check == "example_scale.zero_factor"]


def test_validate_warns_about_a_zero_factor() -> None:
    source = DictSource(STATE)
    zero = ScaleByName(pattern="layers.*.norm.weight", factor=0)
    (finding,) = _own_findings(Plan.build(source, Pipeline([Pipeline([zero])])))  # found inside nested steps
    assert finding.level == "warning" and "layers.*.norm.weight" in finding.message
    assert _own_findings(Plan.build(source, ScaleByName(pattern="layers.*.norm.weight", factor=3))) == []
