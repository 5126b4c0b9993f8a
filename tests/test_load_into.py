"""load_into's guarantees, on real transformers models: ties kept or refused, lossy casts refused,
all or nothing, no aliasing of the source, and ``strict`` that means what it says."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import statebridge as sb
from statebridge import ExecutionError, PlanError, SourceError
from statebridge.tensors.meta import TensorMeta

hf_logging.set_verbosity_error()

#: tiny tied-embedding models, built from configs (nothing downloaded); the embedding name of each
ARCHS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "gpt2": (
        lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=16, bos_token_id=0, eos_token_id=0)),
        "transformer.wte.weight",
    ),
    "llama": (
        lambda: LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=48, max_position_embeddings=16, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        )),
        "model.embed_tokens.weight",
    ),
}
HEAD = "lm_head.weight"
TOKENS = torch.tensor([[1, 5, 7, 3, 2]])


def build(arch: str, how: str, seed: int = 0) -> nn.Module:
    """A tied model: ``real`` (initialised with ``seed``), ``meta`` (``torch.device("meta")``), or ``empty``
    (accelerate's ``init_empty_weights``: parameters on meta, buffers real, tied as ``from_pretrained`` ties)."""
    make, _ = ARCHS[arch]
    if how == "real":
        torch.manual_seed(seed)
        model = make()
    elif how == "meta":
        with torch.device("meta"):
            model = make()
    else:
        with init_empty_weights():
            model = make()
        model.tie_weights()
    model.eval()
    return model


def embedding(model: nn.Module, arch: str) -> nn.Parameter:
    return model.get_parameter(ARCHS[arch][1])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k].is_meta != after[k].is_meta or (not before[k].is_meta and not torch.equal(before[k], after[k]))]
    assert changed == [], f"{len(changed)} of {len(before)} tensors changed: {changed}"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


# ----------------------------------------------------------------------------------------------- ties

#: sources of a tied checkpoint: how transformers saves it (the tied name left out), a state dict,
#: the module itself, and a file holding both names with equal values
TIED_SOURCES = ["save_pretrained", "state_dict", "module", "file_with_both"]
META_BUILDS = [("gpt2", "meta"), ("gpt2", "empty"), ("llama", "empty")]


def tied_source(kind: str, model: nn.Module, tmp_path: Path) -> object:
    if kind == "save_pretrained":
        model.save_pretrained(tmp_path / "saved")
        return tmp_path / "saved" / "model.safetensors"
    if kind == "state_dict":
        return model.state_dict()
    if kind == "module":
        return model
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, tmp_path / "both.safetensors")
    return tmp_path / "both.safetensors"


@pytest.mark.parametrize("kind", TIED_SOURCES)
@pytest.mark.parametrize(("arch", "how"), META_BUILDS)
def test_meta_model_keeps_its_tie_as_one_parameter(tmp_path, arch, how, kind):
    source_model = build(arch, "real", seed=1)
    source = tied_source(kind, source_model, tmp_path)
    model = build(arch, how)
    sb.load_into(model, source)
    assert model.get_parameter(HEAD) is embedding(model, arch)  # one parameter under both names
    assert isinstance(model.get_parameter(HEAD), nn.Parameter) and model.get_parameter(HEAD).requires_grad
    assert torch.equal(embedding(model, arch), embedding(source_model, arch))
    assert torch.equal(logits(model), logits(source_model))
    with torch.no_grad():  # still one tensor after loading: training updates both names
        embedding(model, arch)[0, 0] = 123.0
    assert model.get_parameter(HEAD)[0, 0] == 123.0


@pytest.mark.parametrize("kind", TIED_SOURCES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_real_model_tie_is_filled_from_either_name(tmp_path, arch, kind):
    source_model = build(arch, "real", seed=1)
    source = tied_source(kind, source_model, tmp_path)
    model = build(arch, "real", seed=2)
    sb.load_into(model, source)
    assert model.get_parameter(HEAD) is embedding(model, arch)
    assert torch.equal(embedding(model, arch), embedding(source_model, arch))
    assert torch.equal(logits(model), logits(source_model))


def untied_values(arch: str, tmp_path: Path, kind: str) -> object:
    """A checkpoint of a tied model whose two tied names hold different values."""
    state = {k: v.detach().clone() for k, v in build(arch, "real", seed=1).state_dict().items()}
    state[HEAD] = state[HEAD] + 1
    if kind == "dict":
        return state
    save_file(state, tmp_path / "untied.safetensors")
    return tmp_path / "untied.safetensors"


@pytest.mark.parametrize("kind", ["dict", "file"])
@pytest.mark.parametrize(("arch", "how"), [("gpt2", "real"), ("llama", "real"), *META_BUILDS])
def test_different_values_for_tied_names_are_refused_naming_both(tmp_path, arch, how, kind):
    source = untied_values(arch, tmp_path, kind)
    model = build(arch, how, seed=2)
    before = snapshot(model)
    with pytest.raises(ExecutionError, match=rf"'{ARCHS[arch][1]}' and '{HEAD}' are one tied tensor in the module"):
        sb.load_into(model, source)
    assert_unchanged(model, before)
    if how != "real":
        assert model.get_parameter(HEAD) is embedding(model, arch)


def test_tie_filled_by_a_cast_of_equal_values_loads(tmp_path):
    """Tied names that differ only in dtype but agree once cast to the model's dtype are one value."""
    state = {k: v.detach().clone() for k, v in build("gpt2", "real", seed=1).state_dict().items()}
    state = {k: v.double() if k == HEAD else v for k, v in state.items()}
    model = build("gpt2", "empty")
    sb.load_into(model, state)
    assert model.get_parameter(HEAD) is embedding(model, "gpt2") and model.get_parameter(HEAD).dtype == torch.float32


# ---------------------------------------------------------------------------------------- lossy casts


class Counters(nn.Module):
    """A parameter and an integer (or other) buffer, as position ids or step counters are kept."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("ids", torch.zeros(3, dtype=dtype))


LOSSY = [
    (torch.tensor([1, 300, 2]), torch.int8, r"int8 cannot hold its int64 values \(300 would become 44, 1 of 3 values change\)"),
    (torch.tensor([-1, 0, 1]), torch.uint8, r"uint8 cannot hold its int64 values \(-1 would become 255"),
    (torch.tensor([0, 2**40, 1]), torch.int32, r"int32 cannot hold its int64 values \(1099511627776 would become 0"),
    (torch.tensor([1.0, 2.5, -3.75]), torch.int32, r"int32 cannot hold its float32 values \(2.5 would become 2, 2 of 3 values change\)"),
    (torch.tensor([0.0, float("nan"), 1.0]), torch.int64, r"int64 cannot hold its float32 values \(nan would become"),
    (torch.tensor([0, 2**24 + 1, 2]), torch.float32, r"float32 cannot hold its int64 values \(16777217 would become 16777216.0"),
    (torch.tensor([0, 2, 1]), torch.bool, r"bool cannot hold its int64 values \(2 would become True"),
    (torch.tensor([0.0, 0.5, 1.0]), torch.bool, r"bool cannot hold its float32 values \(0.5 would become True"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(("values", "dtype", "message"), LOSSY, ids=lambda x: str(x)[:24])
def test_casts_that_change_values_are_refused_naming_the_key(values, dtype, message, device):
    with torch.device(device):
        model = Counters(dtype)
    before = snapshot(model)
    # the parameter comes first in plan order: it must not be written either
    with pytest.raises(ExecutionError, match=rf"cannot load 'ids' into Counters: the module's {message}"):
        sb.load_into(model, {"weight": torch.full((3,), 5.0), "ids": values})
    assert_unchanged(model, before)


LOSSLESS = [
    (torch.tensor([1, -2, 127]), torch.int8),
    (torch.tensor([0, 200, 255], dtype=torch.int32), torch.uint8),
    (torch.tensor([3.0, -1.0, 0.0]), torch.int32),
    (torch.tensor([0, 2**24, -7]), torch.float32),
    (torch.tensor([True, False, True]), torch.int64),
    (torch.tensor([-5, 6, 7], dtype=torch.int8), torch.int64),
    (torch.tensor([1, 0, 1]), torch.bool),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(("values", "dtype"), LOSSLESS, ids=str)
def test_casts_that_keep_values_load(values, dtype, device):
    with torch.device(device):
        model = Counters(dtype)
    sb.load_into(model, {"weight": torch.full((3,), 5.0), "ids": values})
    assert model.ids.dtype == dtype and model.ids.device.type == "cpu"
    assert torch.equal(model.ids, values.to(dtype)) and torch.equal(model.ids.to(values.dtype), values)
    assert torch.equal(model.weight.detach(), torch.full((3,), 5.0))


def test_float_casts_round_as_before():
    """Casts between floating-point types are the on-the-fly cast load_into always did: not refused."""
    model = Counters(torch.float16)
    sb.load_into(model, {"weight": torch.full((3,), 1 / 3, dtype=torch.float64), "ids": torch.tensor([0.1, 1e-8, 2.0])})
    assert torch.equal(model.weight.detach(), torch.full((3,), 1 / 3))
    assert torch.equal(model.ids, torch.tensor([0.1, 1e-8, 2.0]).half())


# ------------------------------------------------------------------------------------- all or nothing


class FailOn(sb.Transform):
    """A step whose computing fails on one key: a corrupt tensor or a plugin's bug, at the group we choose."""

    name = "fail_on"

    class Params(sb.Params):
        key: str

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[sb.Group]:
        key = self.params.key

        def fail(tensor: torch.Tensor) -> torch.Tensor:
            raise ExecutionError(f"cannot compute {key!r}")

        return [sb.Group.map_one(key, key, metas[key], fail, "fail")]


class FailingSource(sb.Source):
    """A checkpoint whose last tensor cannot be read (a bad sector, a file cut on the network)."""

    def __init__(self, state: Mapping[str, torch.Tensor], bad: str) -> None:
        self.name, self._state, self._bad = "<failing>", dict(state), bad

    def metas(self) -> Mapping[str, TensorMeta]:
        return {k: TensorMeta.of(v) for k, v in self._state.items()}

    def load(self, key: str) -> torch.Tensor:
        if key == self._bad:
            raise SourceError(self.name, f"cannot read {key!r}")
        return self._state[key].clone()


def last_key(source: object, steps: list | None = None) -> str:
    return list(sb.plan(source, steps).outputs)[-1]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("arch", "how"), [("llama", "real"), ("gpt2", "real"), ("llama", "empty"), ("gpt2", "meta")])
def test_step_failing_on_the_last_group_leaves_the_model_unchanged(tmp_path, arch, how, workers):
    build(arch, "real", seed=1).save_pretrained(tmp_path / "saved")
    source = tmp_path / "saved" / "model.safetensors"
    model = build(arch, how, seed=2)
    before = snapshot(model)
    last = last_key(source)
    with pytest.raises(ExecutionError, match=rf"cannot compute '{last}'"):
        sb.load_into(model, source, [FailOn(key=last)], workers=workers)
    assert_unchanged(model, before)
    # and the same load without the failing step fills it
    sb.load_into(model, source, workers=workers)
    assert torch.equal(logits(model), logits(build(arch, "real", seed=1)))


@pytest.mark.parametrize("how", ["real", "empty"])
def test_source_failing_on_the_last_tensor_leaves_the_model_unchanged(how):
    state = build("llama", "real", seed=1).state_dict()
    del state[HEAD]
    last = last_key(state)
    model = build("llama", how, seed=2)
    before = snapshot(model)
    with pytest.raises(SourceError, match=rf"<failing>: cannot read '{last}'"):
        sb.load_into(model, FailingSource(state, last))
    assert_unchanged(model, before)


def test_refused_cast_on_the_last_group_leaves_a_real_model_unchanged(tmp_path):
    model = build("llama", "real", seed=2)
    model.register_buffer("step", torch.zeros((), dtype=torch.int16))
    state = {k: v + 1 for k, v in model.state_dict().items()} | {"step": torch.tensor(70000)}
    before = snapshot(model)
    with pytest.raises(ExecutionError, match=r"cannot load 'step' into LlamaForCausalLM: the module's int16 cannot hold"):
        sb.load_into(model, state)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------- aliasing


def storages(tensors: object) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if not t.is_meta}


ALIAS_STEPS = {
    "as is": None,
    "renamed and back": [
        sb.Rename(pattern="transformer.h.*.ln_1.weight", to="norms.*"),
        sb.Rename(pattern="norms.*", to="transformer.h.*.ln_1.weight"),
    ],
    "reshaped twice": [sb.Reshape(pattern="transformer.wpe.weight", shape=[-1]), sb.Reshape(pattern="transformer.wpe.weight", shape=[16, 16])],
}


@pytest.mark.parametrize("steps", list(ALIAS_STEPS))
@pytest.mark.parametrize("kind", ["state_dict", "module"])
def test_meta_model_never_shares_memory_with_a_dict_or_module_source(kind, steps):
    source_model = build("gpt2", "real", seed=1)
    reference = snapshot(source_model)
    model = build("gpt2", "meta")
    sb.load_into(model, source_model.state_dict() if kind == "state_dict" else source_model, ALIAS_STEPS[steps])
    assert storages(model.parameters()).isdisjoint(storages(source_model.state_dict().values()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert_unchanged(source_model, reference)  # editing the model never edits the source
    assert model.get_parameter(HEAD) is embedding(model, "gpt2")


def test_share_true_assigns_the_sources_own_tensors():
    source_model = build("gpt2", "real", seed=1)
    state = source_model.state_dict()
    model = build("gpt2", "meta")
    sb.load_into(model, state, share=True)
    for name, p in model.named_parameters():
        assert p.data_ptr() == state[name].data_ptr(), name
    assert torch.equal(logits(model), logits(source_model))


def test_share_true_still_copies_into_allocated_parameters():
    source_model = build("gpt2", "real", seed=1)
    model = build("gpt2", "real", seed=2)
    sb.load_into(model, source_model, share=True)
    assert storages(model.parameters()).isdisjoint(storages(source_model.parameters()))
    assert torch.equal(logits(model), logits(source_model))


def layer_swap(model: nn.Module, prefix: str) -> sb.Rename:
    """A rename that swaps layers 0 and 1: every key of one becomes the other's."""
    mapping = {}
    for key in model.state_dict():
        for a, b in (("0", "1"), ("1", "0")):
            if key.startswith(f"{prefix}.{a}."):
                mapping[key] = f"{prefix}.{b}." + key[len(prefix) + 3 :]
    return sb.Rename(mapping=mapping)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("arch", "prefix"), [("gpt2", "transformer.h"), ("llama", "model.layers")])
def test_module_loaded_from_itself_through_a_swap(arch, prefix, workers):
    model = build(arch, "real", seed=1)
    before = snapshot(model)
    sb.load_into(model, model, [layer_swap(model, prefix)], workers=workers)
    after = model.state_dict()
    for key in before:
        for a, b in (("0", "1"), ("1", "0")):
            if key.startswith(f"{prefix}.{a}."):
                assert torch.equal(after[key], before[f"{prefix}.{b}." + key[len(prefix) + 3 :]]), key
        if not key.startswith(prefix):
            assert torch.equal(after[key], before[key]), key
    assert model.get_parameter(HEAD) is embedding(model, arch)
    sb.load_into(model, model, [layer_swap(model, prefix)])  # swapping back restores every value
    assert_unchanged(model, before)


def test_module_loaded_from_itself_unchanged_costs_no_copy():
    model = build("gpt2", "real", seed=1)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    before = snapshot(model)
    sb.load_into(model, model)
    assert_unchanged(model, before)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers


class Duplicate(sb.Transform):
    """A plugin-style step that returns one tensor object under two names."""

    name = "duplicate"

    class Params(sb.Params):
        input: str
        outputs: list[str]

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[sb.Group]:
        p = self.params
        return [sb.Group(inputs=(p.input,), outputs={o: metas[p.input] for o in p.outputs}, compute=lambda t: {o: t[p.input] for o in p.outputs}, ops=("duplicate",))]


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(4))
        self.b = nn.Parameter(torch.empty(4))


def test_untied_parameters_made_from_one_tensor_do_not_share_memory(tmp_path):
    save_file({"w": torch.arange(4.0)}, tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = Pair()
    sb.load_into(model, tmp_path / "w.safetensors", [Duplicate(input="w", outputs=["a", "b"])])
    with torch.no_grad():
        model.a.add_(1)
    assert torch.equal(model.a.detach(), torch.arange(4.0) + 1)
    assert torch.equal(model.b.detach(), torch.arange(4.0))


# ---------------------------------------------------------------------------------------------- strict


def test_strict_refuses_unexpected_and_missing_keys_and_touches_nothing():
    state = build("llama", "real", seed=1).state_dict()
    model = build("llama", "real", seed=2)
    before = snapshot(model)
    extra = state | {"model.extra.weight": torch.ones(2)}
    with pytest.raises(PlanError, match=r"cannot load into LlamaForCausalLM: 1 keys the module does not have: model.extra.weight"):
        sb.load_into(model, extra)
    short = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(PlanError, match=r"1 module keys the pipeline does not produce: model.norm.weight"):
        sb.load_into(model, short)
    assert_unchanged(model, before)


@pytest.mark.parametrize("how", ["real", "empty"])
def test_strict_false_loads_the_rest_and_warns_with_what_it_skipped(how):
    source_model = build("llama", "real", seed=1)
    state = {k: v for k, v in source_model.state_dict().items() if k not in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight")}
    state["model.extra.weight"] = torch.ones(2)
    state["model.layers.0.unused"] = torch.ones(3)
    model = build("llama", how, seed=2)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning) as caught:
        sb.load_into(model, state, strict=False)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "load_into(strict=False) into LlamaForCausalLM: 2 keys the module does not have were not loaded: "
        "model.extra.weight, model.layers.0.unused; 2 module keys the pipeline does not produce were left as they "
        "were: model.layers.1.mlp.up_proj.weight, model.norm.weight"
    ]
    after = model.state_dict()
    for key in before:
        if key in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight"):
            assert after[key].is_meta == before[key].is_meta and (after[key].is_meta or torch.equal(after[key], before[key]))
        else:
            assert torch.equal(after[key], state[key]), key
    assert not hasattr(model.model, "extra")


def test_strict_false_without_anything_skipped_says_nothing(recwarn):
    source_model = build("gpt2", "real", seed=1)
    model = build("gpt2", "real", seed=2)
    sb.load_into(model, source_model, strict=False)
    assert [str(w.message) for w in recwarn] == []
    assert torch.equal(logits(model), logits(source_model))



class TransposeView(sb.Transform):
    """A plugin-style transpose that returns a view (``x.t()``), not a contiguous copy as the built-in does."""

    name = "transpose_view"

    class Params(sb.Params):
        key: str

    def plan(self, metas: Mapping[str, TensorMeta]) -> list[sb.Group]:
        key, meta = self.params.key, metas[self.params.key]
        return [sb.Group.map_one(key, key, TensorMeta(meta.shape[::-1], meta.dtype), lambda x: x.t(), "transpose")]


@pytest.mark.parametrize("workers", [1, 2])
def test_module_loaded_from_itself_through_a_view_of_the_same_memory(workers):
    """A transposed view of a square weight spans the very bytes it is written to: it is copied first."""
    model = build("llama", "real", seed=1)
    key = "model.layers.0.self_attn.q_proj.weight"
    before = snapshot(model)
    sb.load_into(model, model, [TransposeView(key=key)], workers=workers)
    assert torch.equal(model.get_parameter(key), before[key].t())
    assert_unchanged(model, before | {key: before[key].t()})
