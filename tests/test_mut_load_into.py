"""load_into, checked where mutation testing found the suite blind (docs/testing.md, Score).

Small modules of our own (no transformers model to build): the exact refusal before any data, the
exact warnings, ties kept as one parameter with its ``requires_grad``, buffers kept as buffers in
their submodules, NaN equal to NaN in tied values, swaps within one module, memory never shared
with the caller's tensors unless asked, and what is left on the meta device.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import statebridge as sb
from statebridge import ExecutionError, PlanError
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.module import ModuleWriter, _Extents, _same


class Net(nn.Module):
    """A parameter, a frozen parameter and a buffer at the top, and a submodule holding the same."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 3))
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
        self.sub = nn.Linear(3, 2)
        self.sub.register_buffer("scale", torch.ones(2))


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(v.shape, generator=generator) * 10).to(v.dtype) for k, v in Net().state_dict().items()}


def _outside_statebridge(filename: str) -> bool:
    """Whether a warning points at the caller's line: this file's, or, while mutmut runs the tests (its
    trampoline adds a frame), at least a line outside statebridge."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return filename == __file__
    return "statebridge" not in Path(filename).parent.parts


def _meta_net() -> Net:
    with torch.device("meta"):
        return Net()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_every_tensor_lands_in_its_slot_as_the_right_kind(device):
    model = Net() if device == "cpu" else _meta_net()
    state = _state()
    plan = sb.load_into(model, state)
    assert list(plan.outputs) == list(state)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert set(model._parameters) == {"w", "frozen"} and set(model._buffers) == {"steps"}
    assert set(model.sub._parameters) == {"weight", "bias"} and set(model.sub._buffers) == {"scale"}
    assert isinstance(model.w, nn.Parameter) and model.w.requires_grad
    assert isinstance(model.frozen, nn.Parameter) and not model.frozen.requires_grad
    assert not isinstance(model.sub.scale, nn.Parameter) and model.steps.dtype == torch.int64


def test_every_problem_is_named_before_any_data_is_read():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _state()
    del state["frozen"], state["sub.scale"]
    state["w"] = torch.ones(3, 2)
    state["extra"] = torch.ones(1)
    with pytest.raises(PlanError) as caught:
        sb.load_into(model, state)
    assert str(caught.value) == (
        "cannot load into Net: 1 keys the module does not have: extra; 2 module keys the pipeline does not produce: "
        f"frozen, sub.scale; 'w': the pipeline makes {TensorMeta((3, 2), 'float32')} but the module expects [2, 3]"
    )
    with pytest.raises(PlanError) as caught:  # strict=False: a shape is still an error, alone
        sb.load_into(model, state, strict=False)
    assert str(caught.value) == "cannot load into Net: 'w': the pipeline makes float32[3, 2] but the module expects [2, 3]"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_strict_false_warns_once_naming_what_it_skipped(device):
    model = Net() if device == "cpu" else _meta_net()
    state = _state()
    del state["steps"]
    state["extra"] = torch.ones(1)
    with pytest.warns(RuntimeWarning) as caught:
        sb.load_into(model, state, strict=False)
    assert [str(w.message) for w in caught] == [
        "load_into(strict=False) into Net: 1 keys the module does not have were not loaded: extra; "
        "1 module keys the pipeline does not produce were left as they were: steps"
    ]
    assert _outside_statebridge(caught[0].filename)  # the caller's line
    assert torch.equal(model.w.detach(), state["w"]) and not hasattr(model, "extra")
    assert model.steps.is_meta == (device == "meta")


@pytest.mark.parametrize("what", ["extra", "missing"])
def test_strict_false_names_only_what_there_is(what):
    state = _state()
    if what == "extra":
        state["extra"] = torch.ones(1)
        expected = "load_into(strict=False) into Net: 1 keys the module does not have were not loaded: extra"
    else:
        del state["steps"]
        expected = "load_into(strict=False) into Net: 1 module keys the pipeline does not produce were left as they were: steps"
    with pytest.warns(RuntimeWarning) as caught:
        sb.load_into(Net(), state, strict=False)
    assert [str(w.message) for w in caught] == [expected]


class WithState(Net):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(4), persistent=False)


def test_tensors_left_on_meta_are_named_once_but_not_those_strict_false_left():
    with torch.device("meta"):
        model = WithState()
    state = _state()
    with pytest.warns(RuntimeWarning) as caught:
        sb.load_into(model, state)
    assert [str(w.message) for w in caught] == [
        "1 tensors of WithState are still on the meta device because the state dict does not hold them (non-persistent "
        "buffers?): cache; build the model with parameters on meta and buffers real (e.g. accelerate.init_empty_weights()) "
        "or re-create them"
    ]
    assert _outside_statebridge(caught[0].filename)
    with torch.device("meta"):
        model = WithState()
    del state["steps"]
    with pytest.warns(RuntimeWarning) as caught:
        sb.load_into(model, state, strict=False)
    assert [str(w.message).split(":")[0] for w in caught] == [
        "load_into(strict=False) into WithState",
        "1 tensors of WithState are still on the meta device because the state dict does not hold them (non-persistent buffers?)",
    ]


def test_a_model_filled_entirely_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb.load_into(_meta_net(), _state())
        sb.load_into(Net(), _state())


# -- ties ---------------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self, requires_grad: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(3, 2, bias=False)
        self.other = nn.Parameter(torch.zeros(2, 3))
        self.second = nn.Linear(3, 2, bias=False)
        self.second.weight = self.first.weight
        self.first.weight.requires_grad_(requires_grad)


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("given", [["first.weight"], ["second.weight"], ["first.weight", "second.weight"]])
def test_a_meta_tie_becomes_one_parameter_whatever_name_fills_it(given, requires_grad):
    with torch.device("meta"):
        model = Tied(requires_grad)
    value = torch.arange(6.0).reshape(2, 3)
    sb.load_into(model, {**{name: value.clone() for name in given}, "other": torch.ones(2, 3)})
    assert model.first.weight is model.second.weight
    assert model.first.weight.requires_grad == requires_grad
    assert torch.equal(model.second.weight.detach(), value)
    assert torch.equal(model.other.detach(), torch.ones(2, 3))
    assert model.other.untyped_storage().data_ptr() != model.first.weight.untyped_storage().data_ptr()


def test_different_values_for_tied_names_are_refused_naming_both_in_module_order():
    for order in (["second.weight", "first.weight"], ["first.weight", "second.weight"]):
        model = Tied()
        before = model.first.weight.detach().clone()
        state = {order[0]: torch.ones(2, 3), "other": torch.ones(2, 3), order[1]: torch.full((2, 3), 2.0)}
        with pytest.raises(ExecutionError) as caught:
            sb.load_into(model, state)
        assert str(caught.value) == (
            "cannot load into Tied: 'first.weight' and 'second.weight' are one tied tensor in the module, but the "
            "pipeline gives them different values; drop one of them (the tie fills both) or untie the module"
        )
        assert torch.equal(model.first.weight.detach(), before)


def test_tied_values_with_nan_in_the_same_places_are_one_value():
    value = torch.tensor([[1.0, float("nan"), 3.0], [float("nan"), 5.0, 6.0]])
    model = Tied()
    sb.load_into(model, {"first.weight": value.clone(), "other": torch.ones(2, 3), "second.weight": value.clone()})
    assert torch.equal(model.first.weight.detach().isnan(), value.isnan())
    assert _same(value, value.clone())
    assert not _same(value, torch.nan_to_num(value))
    assert _same(torch.tensor([1, 2]), torch.tensor([1, 2])) and not _same(torch.tensor([1, 2]), torch.tensor([1, 3]))


# -- memory -------------------------------------------------------------------------------


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.arange(6.0).reshape(2, 3))
        self.b = nn.Parameter(-torch.arange(6.0).reshape(2, 3))


def test_a_module_loaded_from_itself_through_a_swap():
    model = Pair()
    steps = [sb.Rename(pattern="a", to="tmp"), sb.Rename(pattern="b", to="a"), sb.Rename(pattern="tmp", to="b")]
    sb.load_into(model, model, steps)
    assert torch.equal(model.a.detach(), -torch.arange(6.0).reshape(2, 3))
    assert torch.equal(model.b.detach(), torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("share", [False, True])
def test_a_meta_model_shares_the_callers_memory_only_when_asked(share):
    state = _state()
    model = _meta_net()
    sb.load_into(model, state, share=share)
    same = [model.state_dict()[k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for k, v in state.items()]
    assert same == [share] * len(state)


def test_views_of_one_storage_are_told_apart_by_their_bytes():
    base = torch.arange(12.0)
    extents = _Extents([base[0:4]])
    assert extents.overlaps(base[3:6]) and extents.overlaps(base[0:1]) and extents.overlaps(base)
    assert not extents.overlaps(base[4:8]) and not extents.overlaps(torch.arange(4.0)) and not extents.overlaps(base[4:4])
    strided = base.reshape(3, 4)[:, 1]  # elements 1, 5, 9: bytes 4 to 40
    extents = _Extents([strided])
    assert extents.overlaps(base[9:10]) and extents.overlaps(base[1:2]) and not extents.overlaps(base[10:12])
    assert not extents.overlaps(base[0:1])
    assert not _Extents([torch.empty(0)]).overlaps(torch.empty(0))


def test_a_meta_slot_gets_the_slot_dtype_and_a_real_one_casts_on_copy():
    model = _meta_net()
    state = {k: v.double() if v.is_floating_point() else v for k, v in _state().items()}
    sb.load_into(model, state)
    assert model.w.dtype == torch.float32 and torch.equal(model.w.detach(), state["w"].float())
    writer = ModuleWriter(Net())
    kept = state["w"]
    assert writer._cast("w", kept, writer.slots["w"]) is kept  # copy_ casts at commit: a map stays a map until then


def test_a_slot_given_itself_is_staged_as_it_is_without_a_copy():
    """Loading a module from itself unchanged costs no copy: the staged tensor is the slot itself."""
    model = Pair()
    writer = ModuleWriter(model)
    writer.begin({k: TensorMeta.of(v) for k, v in model.state_dict().items()})
    writer.write("a", model.a)
    writer.write("b", model.a)  # a's bytes, for b: overwritten by the commit, so copied
    assert writer._staged["a"] is model.a
    assert writer._staged["b"].untyped_storage().data_ptr() != model.a.untyped_storage().data_ptr()
    writer.finish()
    assert torch.equal(model.b.detach(), model.a.detach())


@pytest.mark.parametrize("wide_first", [True, False])
def test_tied_values_are_compared_in_the_slot_dtype(wide_first):
    """0.1 in float64 and in float32 are one value for a float32 tie (compared in float64 they differ)."""
    wide, narrow = torch.full((2, 3), 0.1, dtype=torch.float64), torch.full((2, 3), 0.1, dtype=torch.float32)
    first, second = (wide, narrow) if wide_first else (narrow, wide)
    model = Tied()
    sb.load_into(model, {"first.weight": first, "other": torch.ones(2, 3), "second.weight": second})
    assert torch.equal(model.second.weight.detach(), narrow)


def test_progress_is_shown_when_asked_and_not_otherwise(capsys):
    state = _state()
    sb.load_into(Net(), state, progress=True)
    shown = capsys.readouterr().err
    assert shown.startswith("\rstatebridge:") and "100%" in shown
    sb.load_into(Net(), state, progress=False)
    sb.load_into(Net(), state)  # not a terminal: no bar
    assert capsys.readouterr().err == ""


class SharedBytes(nn.Module):
    """Two parameter objects over the same bytes (as ``nn.Parameter(other.data)`` makes): one tensor in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, 3))
        self.b = nn.Parameter(self.a.data)


def test_parameters_over_the_same_bytes_are_one_tie():
    model = SharedBytes()
    with pytest.raises(ExecutionError) as caught:
        sb.load_into(model, {"a": torch.ones(2, 3), "b": torch.full((2, 3), 2.0)})
    assert str(caught.value).startswith("cannot load into SharedBytes: 'a' and 'b' are one tied tensor in the module")
    assert torch.equal(model.a.detach(), torch.zeros(2, 3))
    sb.load_into(model, {"b": torch.full((2, 3), 2.0)})  # either name fills the tie
    assert torch.equal(model.a.detach(), torch.full((2, 3), 2.0))


class Empties(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("flat", torch.zeros(0))
        self.register_buffer("wide", torch.zeros(0, 3, dtype=torch.int64))
        self.w = nn.Parameter(torch.zeros(2))


def test_empty_tensors_are_never_tied_to_each_other():
    model = Empties()
    sb.load_into(model, {"flat": torch.zeros(0), "wide": torch.zeros(0, 3, dtype=torch.int64), "w": torch.ones(2)})
    assert torch.equal(model.w.detach(), torch.ones(2))
    assert tuple(model.wide.shape) == (0, 3) and model.wide.dtype == torch.int64


def test_a_module_writer_is_strict_and_shares_nothing_unless_told():
    state = _state()
    writer = ModuleWriter(Net())
    with pytest.raises(PlanError, match="1 module keys the pipeline does not produce: steps"):
        writer.begin({k: TensorMeta.of(v) for k, v in state.items() if k != "steps"})
    source = sb.readers.DictSource(state)
    writer = ModuleWriter(_meta_net(), source=source)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    writer.write("w", source.load("w"))
    assert writer._staged["w"].untyped_storage().data_ptr() != state["w"].untyped_storage().data_ptr()


class Threads(sb.Transform):
    """Records how many intra-op threads torch offers while a group computes."""

    name = "record_threads_load_into"
    seen: list[int] = []

    def plan(self, metas):
        def fn(x: torch.Tensor) -> torch.Tensor:
            Threads.seen.append(torch.get_num_threads())
            return x

        return [sb.Group.map_one(key, key, meta, fn, "record") for key, meta in metas.items()]


def test_load_into_runs_one_worker_unless_asked():
    """One worker by default: torch keeps all its threads for each group."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        Threads.seen = []
        sb.load_into(Pair(), {"a": torch.ones(2, 3), "b": torch.ones(2, 3)}, [Threads()])
        assert Threads.seen == [4, 4]
    finally:
        torch.set_num_threads(before)
