"""lora_merge against the real PEFT: merged weights bitwise equal to merge_and_unload, logits equal to the unmerged forward."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import statebridge as sb
from statebridge.testing import run_cli
from statebridge_lora import merge
from statebridge_lora.transforms import LoraMerge

sys.path.insert(0, str(Path(__file__).parent))
from peft_cases import (  # noqa: E402
    TOKENS, ConvNet, bert, convnet, differences, gpt2, llama, load_model, make_adapter, merged_logits, our_merge,
    peft_logits, peft_merged,
)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def base_gpt2(tmp_path_factory) -> Path:
    return gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def check(base: Path, adapter: Path, out: Path, logits: bool = True, **params) -> LoraMerge:
    ours, step = our_merge(base, out, adapter=str(adapter), **params)
    assert differences(ours, peft_merged(base, adapter, safe_merge=params.get("safe_merge", False))) == []
    if logits:
        torch.testing.assert_close(merged_logits(out), peft_logits(base, adapter), atol=1e-4, rtol=1e-4)
    return step


def test_linear_lora_on_every_projection_is_bitwise_peft(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=LINEAR)
    step = check(base, adapter, tmp_path / "out")
    assert len(step.records) == 14 and all(r.how == "lora" and r.rounding == r.max_rounding == 0 for r in step.records.values())
    base_w, ours = load_file(base / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    for key, r in step.records.items():  # |dW|/|W|, measured here from the files
        expected = torch.linalg.vector_norm(ours[key] - base_w[key]) / torch.linalg.vector_norm(base_w[key])
        assert r.change == pytest.approx(float(expected), rel=1e-4), key
    as_json = json.loads(json.dumps(step.report().to_dict()))
    assert len(as_json["rows"]) == 14 and as_json["records"][0]["key"] == "model.layers.0.mlp.down_proj.weight"
    # only the adapted tensors were computed: the norms and embeddings are the base's bytes
    assert load_file(tmp_path / "out/model.safetensors")["model.norm.weight"].equal(load_file(base / "model.safetensors")["model.norm.weight"])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_safe_merge_is_bitwise_peft_safe_merge(base: Path, tmp_path: Path, dora: bool) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, use_dora=dora,
                           target_modules=["q_proj", "down_proj", "embed_tokens"])
    check(base, adapter, tmp_path / "out", logits=False, safe_merge=True)


def test_safe_merge_refuses_a_broken_adapter_naming_the_tensor(base: Path, tmp_path: Path) -> None:
    def broken(model) -> None:
        model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.data[0, 0] = float("nan")

    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["down_proj"], perturb=broken)
    with pytest.raises(sb.ExecutionError, match="'model.layers.1.mlp.down_proj.weight': the merged weight has NaN"):
        our_merge(base, tmp_path / "out", adapter=str(adapter), safe_merge=True)
    assert not (tmp_path / "out").exists()
    ours, _ = our_merge(base, tmp_path / "out", adapter=str(adapter))  # without safe_merge: PEFT's NaN, as PEFT
    assert ours["model.layers.1.mlp.down_proj.weight"][0].isnan().all()


def test_rslora_is_bitwise_peft(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"])
    step = check(base, adapter, tmp_path / "out")
    assert "s=1.41421" in " ".join(step.plan({k: v for k, v in sb.open_source(base).metas().items()})[0].ops)


def test_rank_and_alpha_patterns_follow_peft_matching(base: Path, tmp_path: Path) -> None:
    # "q_proj" matches every layer's q_proj at a dot; "layers.1.mlp.down_proj" only layer 1's
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                           rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3})
    step = check(base, adapter, tmp_path / "out")
    ops = {g.inputs[0]: g.ops[0] for g in step.plan(dict(sb.open_source(base).metas()))}
    assert "r=2 s=4" in ops["model.layers.0.self_attn.q_proj.weight"]
    assert "r=4 s=0.75" in ops["model.layers.1.mlp.down_proj.weight"]
    assert "r=4 s=2" in ops["model.layers.0.mlp.down_proj.weight"]


def test_embedding_lora_and_modules_to_save(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=4, target_modules=["embed_tokens", "v_proj"],
                           modules_to_save=["lm_head"])
    step = check(base, adapter, tmp_path / "out")
    assert step.records["lm_head.weight"].how == "replaced" and step.records["lm_head.weight"].change > 0
    assert step.records["model.embed_tokens.weight"].how == "lora"


def test_dora_on_linear_and_embedding(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "o_proj", "down_proj", "embed_tokens"])
    step = check(base, adapter, tmp_path / "out")
    assert {r.how for r in step.records.values()} == {"dora"}


def test_lora_bias_is_merged_into_the_base_bias(tmp_path: Path) -> None:
    base = llama(tmp_path / "base", attention_bias=True)
    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, lora_bias=True, target_modules=["q_proj", "v_proj"],
                           perturb=lambda m: [p.data.add_(1.0) for n, p in m.named_parameters() if "lora_B" in n and n.endswith("bias")])
    check(base, adapter, tmp_path / "out")


def test_trained_biases_bias_lora_only_replace_the_base_biases(tmp_path: Path) -> None:
    base = llama(tmp_path / "base", attention_bias=True)

    def train_biases(model) -> None:
        for name, p in model.named_parameters():
            if name.endswith("q_proj.base_layer.bias"):
                p.data.add_(0.5)

    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, bias="lora_only", target_modules=["q_proj"],
                           perturb=train_biases)
    step = check(base, adapter, tmp_path / "out")
    assert step.records["model.layers.1.self_attn.q_proj.bias"].how == "replaced"


def test_adapter_saved_as_a_torch_pickle(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["k_proj"], safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file()
    check(base, adapter, tmp_path / "out", logits=False)


def test_gpt2_conv1d_fan_in_fan_out(base_gpt2: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base_gpt2, tmp_path / "ad", r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "c_fc"])
    check(base_gpt2, adapter, tmp_path / "out")


def test_gpt2_conv1d_dora(base_gpt2: Path, tmp_path: Path) -> None:
    """PEFT #3531: DoRA on Conv1D needs the norm over the right axis; we agree with PEFT 0.21 bitwise."""
    adapter = make_adapter(base_gpt2, tmp_path / "ad", r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                           target_modules=["c_attn", "c_fc"])
    check(base_gpt2, adapter, tmp_path / "out")


def test_bert_classifier_with_its_task_head_saved(tmp_path: Path) -> None:
    """task_type SEQ_CLS makes PEFT save the classifier whole (modules_to_save) beside LoRA on query and value."""
    base = bert(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, task_type="SEQ_CLS", target_modules=["query", "value"])
    step = check(base, adapter, tmp_path / "out")
    assert step.records["classifier.weight"].how == "replaced" and step.records["classifier.weight"].change > 0
    assert step.records["bert.encoder.layer.1.attention.self.value.weight"].how == "lora"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv2d_conv1d_and_linear_of_a_custom_module(tmp_path: Path, dora: bool) -> None:
    path, model = convnet(tmp_path / "net.safetensors")
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, use_dora=dora,
                                                  target_modules=["conv", "point", "seq", "head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "ad")
    fresh = ConvNet()
    fresh.load_state_dict(load_file(path))
    reference = PeftModel.from_pretrained(fresh, tmp_path / "ad").eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        unmerged = reference(x)
    merged = reference.merge_and_unload().state_dict()
    sb.run(path, [LoraMerge(adapter=str(tmp_path / "ad"))], tmp_path / "out.safetensors", progress=False)
    ours = load_file(tmp_path / "out.safetensors")
    assert differences(ours, merged) == []
    plain = ConvNet()
    plain.load_state_dict(ours)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_equals_peft_default_path(tmp_path: Path, dora: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge, "BLOCK", 200)  # several blocks per weight (q_proj: 6 rows of 32 a block, the last one 2)
    base = llama(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, use_dora=dora,
                           target_modules=["q_proj", "down_proj", "embed_tokens"])
    reference = PeftModel.from_pretrained(load_model(base), adapter)
    assert reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ours, step = our_merge(base, tmp_path / "out", adapter=str(adapter))
    assert differences(ours, {k: v.detach() for k, v in reference.merge_and_unload().state_dict().items()}) == []
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    quiet, silent = our_merge(base, tmp_path / "quiet", adapter=str(adapter), report=False)
    assert silent.records == {} and all(torch.equal(quiet[k], ours[k]) for k in ours)
    # the report measures the one rounding into bfloat16: against the same merge done in float32 by PEFT
    exact = PeftModel.from_pretrained(load_model(base).float(), adapter).merge_and_unload().state_dict()
    for key, r in step.records.items():
        err = exact[key] - ours[key].float()
        assert r.rounding == pytest.approx(float(torch.linalg.vector_norm(err) / torch.linalg.vector_norm(exact[key])), rel=1e-3)
        assert r.max_rounding == pytest.approx(float(err.abs().max()), rel=1e-3) and 1e-5 < r.rounding < 4e-3
        if not dora:  # |dW|/|W|: PEFT's float32 delta, here recovered from the float32 merge
            w = load_file(base / "model.safetensors")[key].float()
            assert r.change == pytest.approx(float(torch.linalg.vector_norm(exact[key] - w) / torch.linalg.vector_norm(w)), rel=1e-3)


def test_workspace_is_reused_by_a_thread_and_never_shared(tmp_path: Path) -> None:
    """ΔW goes into one float32 buffer per thread, kept from group to group: workers must not share it."""
    step = LoraMerge(adapter=str(tmp_path))
    first = step._workspace(12)
    assert step._workspace(8).data_ptr() == first.data_ptr() and first.dtype == torch.float32
    other: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: other.append(step._workspace(12)))
    worker.start()
    worker.join()
    assert other[0].data_ptr() != first.data_ptr()
    assert step._workspace(20).numel() == 20  # grown for a larger weight


def test_dora_zero_norm_rows_merge_without_nan_and_are_reported(base: Path, tmp_path: Path) -> None:
    """PEFT #2049: a base row of zeros with no update has zero norm; PEFT writes NaN, we keep the zero row."""
    weights = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.o_proj.weight"
    weights[key][:3] = 0
    zeroed = tmp_path / "base"
    zeroed.mkdir()
    from safetensors.torch import save_file

    save_file(weights, zeroed / "model.safetensors", metadata={"format": "pt"})
    (zeroed / "config.json").write_text((base / "config.json").read_text())

    def no_update_for_the_zero_rows(model) -> None:
        model.base_model.model.model.layers[0].self_attn.o_proj.lora_B["default"].weight.data[:3] = 0

    adapter = make_adapter(zeroed, tmp_path / "ad", r=2, lora_alpha=2, use_dora=True, target_modules=["o_proj"],
                           perturb=no_update_for_the_zero_rows)
    reference = peft_merged(zeroed, adapter)
    assert reference[key][:3].isnan().all()  # PEFT's result
    ours, step = our_merge(zeroed, tmp_path / "out", adapter=str(adapter))
    assert not ours[key].isnan().any() and ours[key][:3].eq(0).all()
    assert ours[key][3:].equal(reference[key][3:])  # every other row still PEFT's bits
    assert step.records[key].zero_norm_rows == 3
    assert "3 DoRA rows had zero norm" in step.report().render()


# several adapters: PEFT's add_weighted_adapter (cat, linear) and merge_and_unload over several (sequential)


def _two_adapters(base: Path, tmp_path: Path, **second) -> tuple[Path, Path]:
    a = make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    b = make_adapter(base, tmp_path / "b", seed=2, **{"r": 4, "lora_alpha": 2, "target_modules": ["q_proj", "down_proj"], **second})
    return a, b


def _peft_weighted(base: Path, a: Path, b: Path, weights: list[float], combination: str) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(load_model(base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination)
    model.set_adapter("mix")
    return {k: v.detach() for k, v in model.merge_and_unload(adapter_names=["mix"]).state_dict().items()}


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_two_weighted_adapters_as_add_weighted_adapter(base: Path, tmp_path: Path, combination: str) -> None:
    a, b = _two_adapters(base, tmp_path, rank_pattern={"down_proj": 2} if combination == "cat" else {})
    reference = _peft_weighted(base, a, b, [0.7, -0.4], combination)
    ours, _ = our_merge(base, tmp_path / "out", adapters=[{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": -0.4}],
                        combination=combination)
    assert differences(ours, reference) == []


def test_cat_is_the_weighted_sum_of_the_deltas(base: Path, tmp_path: Path) -> None:
    a, b = _two_adapters(base, tmp_path)
    first, _ = our_merge(base, tmp_path / "oa", adapter=str(a))
    second, _ = our_merge(base, tmp_path / "ob", adapter=str(b))
    both, _ = our_merge(base, tmp_path / "out", adapters=[{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2.0}])
    w = load_file(base / "model.safetensors")
    for key in w:
        expected = w[key] + 0.5 * (first[key] - w[key]) + 2.0 * (second[key] - w[key])
        torch.testing.assert_close(both[key], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, -2.0)])
def test_sequential_is_merge_and_unload_of_both_scaled_by_set_scale(base: Path, tmp_path: Path, weights) -> None:
    from peft.tuners.lora import LoraLayer

    a, b = _two_adapters(base, tmp_path, use_rslora=True)
    model = PeftModel.from_pretrained(load_model(base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        layer.set_scale("a", weights[0])
        layer.set_scale("b", weights[1])
    reference = {k: v.detach() for k, v in model.merge_and_unload(adapter_names=["a", "b"]).state_dict().items()}
    ours, _ = our_merge(base, tmp_path / "out", combination="sequential",
                        adapters=[{"path": str(a), "weight": weights[0]}, {"path": str(b), "weight": weights[1]}])
    assert differences(ours, reference) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sequential_dora_adapters_replay_peft_unmerge_and_merge(tmp_path: Path, dtype: torch.dtype) -> None:
    """PEFT #3608/#3609: each DoRA adapter's norm comes from the unmerged base, which PEFT rebuilds by unmerging."""
    base = llama(tmp_path / "base", dtype=dtype)
    targets = ["q_proj", "down_proj", "embed_tokens"]
    a = make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    b = make_adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    c = make_adapter(base, tmp_path / "c", seed=3, r=4, lora_alpha=4, use_dora=True, target_modules=targets)
    model = PeftModel.from_pretrained(load_model(base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.load_adapter(c, adapter_name="c")
    reference = {k: v.detach() for k, v in model.merge_and_unload(adapter_names=["a", "b", "c"]).state_dict().items()}
    ours, step = our_merge(base, tmp_path / "out", combination="sequential",
                           adapters=[{"path": str(a)}, {"path": str(b)}, {"path": str(c)}])
    assert differences(ours, reference) == []
    assert step.records["model.layers.0.self_attn.q_proj.weight"].how == "dora"
    with pytest.raises(sb.PlanError, match="does not combine DoRA magnitudes; use combination: sequential"):
        sb.plan(base, [LoraMerge(adapters=[{"path": str(a)}, {"path": str(b)}])])


def test_a_tensor_two_adapters_replace_is_an_error(base: Path, tmp_path: Path) -> None:
    a = make_adapter(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    b = make_adapter(base, tmp_path / "b", r=2, lora_alpha=2, target_modules=["v_proj"], modules_to_save=["lm_head"])
    with pytest.raises(sb.PlanError, match="'lm_head.weight' is replaced by two adapters"):
        sb.plan(base, [LoraMerge(adapters=[{"path": str(a)}, {"path": str(b)}])])


def test_linear_refuses_adapters_of_different_ranks(base: Path, tmp_path: Path) -> None:
    a, b = _two_adapters(base, tmp_path, r=2)
    with pytest.raises(sb.PlanError, match="combination 'linear' needs adapters of one rank .*r=4.*r=2"):
        sb.plan(base, [LoraMerge(adapters=[{"path": str(a)}, {"path": str(b)}], combination="linear")])


# errors: one line naming what is wrong


def test_other_peft_types_are_refused_naming_the_type(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(sb.SourceError, match="peft_type is 'IA3'.*LoRA adapters .*only"):
        sb.plan(base, [LoraMerge(adapter=str(adapter))])


def test_an_adapter_of_a_residual_base_is_warned_about(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj"])
    assert [f for f in sb.plan(base, [LoraMerge(adapter=str(adapter))]).findings if f.check == "lora.residual_init"] == []
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    (finding,) = [f for f in sb.plan(base, [sb.Sequential([LoraMerge(adapter=str(adapter))])]).findings
                  if f.check == "lora.residual_init"]
    assert finding.level == "warning" and "'pissa_niter_4'" in finding.message and str(adapter) in finding.message


def test_modules_that_match_no_base_tensor_are_an_error_naming_them(base: Path, base_gpt2: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(sb.PlanError, match=r"match no base tensor: model\.layers\.0\.self_attn\.q_proj\.weight, "
                                           r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        sb.plan(base_gpt2, [LoraMerge(adapter=str(adapter))])


def test_a_wrong_fan_in_fan_out_is_refused_with_a_hint(base_gpt2: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base_gpt2, tmp_path / "ad", r=2, lora_alpha=2, fan_in_fan_out=True, target_modules=["c_fc"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    with pytest.raises(sb.PlanError, match="do not fit 'transformer.h.0.mlp.c_fc.weight' .*fan_in_fan_out is False"):
        sb.plan(base_gpt2, [LoraMerge(adapter=str(adapter))])


def test_adapters_paths_in_a_config_file_are_relative_to_it(base: Path, tmp_path: Path) -> None:
    a, b = _two_adapters(base, tmp_path)
    config = tmp_path / "merge.yaml"
    config.write_text(f"source: {base}\ntarget: out\nsteps:\n  - lora_merge:\n      adapters: [{{path: a, weight: 0.5}}, {{path: b}}]\n")
    step = sb.load_config(str(config)).pipeline().steps[0]
    assert [r.path for r in step.params.adapters] == [str(a), str(b)]


# the command


@pytest.mark.slow  # a fresh interpreter that imports torch and transformers: about 5 s
def test_command_merges_a_model_folder_into_a_folder_from_pretrained_loads(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=LINEAR, modules_to_save=["lm_head"])
    done = run_cli(["lora", "merge", str(base), str(adapter), str(tmp_path / "out")])
    assert done.returncode == 0, done.stderr
    assert "lora_merge report" in done.stdout
    assert re.search(r"^  model\.layers\.1\.mlp\.down_proj\.weight +lora +\d\.\d{3}e[-+]\d\d +0\.000e\+00 ", done.stdout, re.M)
    assert re.search(r"^  lm_head\.weight +replaced ", done.stdout, re.M)
    assert (tmp_path / "out/config.json").read_text() == (base / "config.json").read_text()
    torch.testing.assert_close(merged_logits(tmp_path / "out"), peft_logits(base, adapter), atol=1e-4, rtol=1e-4)
    assert differences(load_file(tmp_path / "out/model.safetensors"), peft_merged(base, adapter)) == []


def test_command_errors_are_one_line(base: Path, tmp_path: Path) -> None:
    done = run_cli(["lora", "merge", str(base), str(tmp_path), str(tmp_path / "out")])
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no adapter_config.json" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a fresh interpreter
def test_planning_a_merge_never_imports_torch(base: Path, tmp_path: Path) -> None:
    """The plan reads headers and JSON only: a dry run of a lora_merge config imports no torch."""
    import subprocess

    adapter = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj"])
    config = tmp_path / "merge.yaml"
    config.write_text(f"source: {base}\ntarget: {tmp_path / 'out'}\nsteps:\n  - lora_merge: {{adapter: {adapter}}}\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "statebridge", "run", str(config), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "statebridge_lora.transforms" in modules and "torch" not in modules
    assert "lora_merge(ad r=2 s=1)" in done.stdout


def test_sharded_model_folder_in_sharded_folder_out_byte_identical_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tmp_path / "base"
    load_model(llama(tmp_path / "plain")).save_pretrained(base, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file()
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=LINEAR, use_dora=True)
    for out in ("one", "two"):
        sb.run(base, [LoraMerge(adapter=str(adapter))], tmp_path / out, progress=False, shard_size=40_000)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
    reference = peft_merged(base, adapter)
    merged = load_model(tmp_path / "one").state_dict()
    assert [k for k in reference if not torch.equal(merged[k], reference[k])] == []
