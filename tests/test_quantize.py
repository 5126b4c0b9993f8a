"""The ``quantize`` step (issue 14): a type change only where a config asks, the gguf library's own blocks, said in the plan.

The reference is the ``gguf`` library: a tensor our step writes as Q8_0 (Q4_0, ...) must hold
the very bytes ``gguf.quants.quantize`` gives for the same float values, and the real Gemma
3 270M Q4_K_M with ``quantize: {"blk.*.ffn_down.weight": Q8_0}`` must change those 18
tensors and no other byte of tensor data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

import statebridge as sb
from statebridge import ConfigError, NotInvertibleError, PlanError
from statebridge.readers.gguf import GGUFSource
from statebridge.tensors.meta import TensorMeta
from statebridge.transforms.quantize import encodable

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_passthrough import _small, _stored, _tensors  # noqa: E402
from test_torch_free import run_cli  # noqa: E402

#: the block types the installed gguf encodes (F32, F16 and BF16 are plain dtypes)
BLOCK_TYPES = [t for t in encodable() if t not in ("F32", "F16", "BF16")]
#: largest error of a decoded value, as a share of its block's largest magnitude, for the classic types
ERROR = {"Q8_0": 1 / 120, "Q5_0": 1 / 15, "Q5_1": 1 / 15, "Q4_0": 1 / 7, "Q4_1": 1 / 7}


def _floats(path: Path, rows: int = 4, cols: int = 256) -> tuple[Path, np.ndarray]:
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    save_file({"w": torch.from_numpy(values), "norm": torch.ones(cols), "ids": torch.arange(4)}, path)
    return path, values


def test_the_gguf_library_encodes_the_classic_types() -> None:
    assert {"F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"} <= set(encodable())
    assert "Q4_K" not in encodable()  # gguf 0.x decodes but cannot encode the k-quants


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_our_blocks_are_the_gguf_librarys(tmp_path: Path, qtype: str) -> None:
    source, values = _floats(tmp_path / "s.safetensors")
    sb.run(source, [sb.Quantize({"w": qtype})], tmp_path / "o.gguf")
    written = _tensors(tmp_path / "o.gguf")
    assert written["w"][0] == Q[qtype]
    assert written["w"][2] == gguf.quants.quantize(values, Q[qtype]).tobytes()
    assert written["norm"][0] == Q.F32  # not matched: as it was
    decoded = GGUFSource(tmp_path / "o.gguf").load("w")
    assert torch.equal(decoded, torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(values, Q[qtype]), Q[qtype])))
    if qtype in ERROR:
        blocks = values.reshape(-1, gguf.GGML_QUANT_SIZES[Q[qtype]][0])
        bound = np.abs(blocks).max(axis=1, keepdims=True) * ERROR[qtype]
        assert (np.abs(decoded.numpy().reshape(blocks.shape) - blocks) <= bound).all()


@pytest.mark.parametrize("qtype, dtype", [("F16", torch.float16), ("BF16", torch.bfloat16), ("f32", torch.float32)])
def test_float_types_are_dtypes_any_format_stores(tmp_path: Path, qtype: str, dtype: torch.dtype) -> None:
    source, values = _floats(tmp_path / "s.safetensors")
    step = sb.Quantize({"w": qtype})
    plan = sb.plan(source, [step])
    assert plan.outputs["w"] == TensorMeta((4, 256), dtype)
    sb.run(source, [step], tmp_path / "o.gguf")
    name = qtype.upper()
    assert _tensors(tmp_path / "o.gguf")["w"][2] == gguf.quants.quantize(values, Q[name]).tobytes()
    sb.run(source, [step], tmp_path / "o.safetensors")  # a plain dtype: safetensors has it
    assert sb.open_source(tmp_path / "o.safetensors").load("w").dtype == dtype


def test_the_plan_lists_every_type_change(tmp_path: Path) -> None:
    source = _small(tmp_path / "s.gguf")  # blk.0.w Q8_0, blk.0.v Q4_0, norm F32
    steps = [sb.Quantize({"blk.0.*": "Q8_0", "norm": "F16"})]
    plan = sb.plan(source, steps)
    assert plan.outputs["blk.0.v"] == TensorMeta((4, 64), torch.float32, "Q8_0", encode=True)
    assert plan.outputs["blk.0.w"] == TensorMeta((4, 64), torch.float32, "Q8_0")  # already Q8_0: carried as it is
    rendered = plan.render()
    assert "info (plan.types): type change Q4_0 -> Q8_0: 1 tensors, blk.0.v" in rendered
    assert "info (plan.types): type change F32 -> F16: 1 tensors, norm" in rendered
    assert "blk.0.w" not in rendered.split("changes:")[1].split("unchanged")[0]
    data = plan.to_dict()
    shown = {k: v for group in data["groups"] for k, v in group["outputs"].items()}
    assert shown["blk.0.v"] == "float32[4, 64] (quantized to Q8_0)" and shown["norm"] == "float16[64]"
    assert "info (plan.types): type change Q4_0 -> Q8_0: 1 tensors, blk.0.v" in data["findings"]
    sb.api.target_writer(plan, tmp_path / "o.gguf")
    assert "quantized, copied as their stored blocks: 1 Q8_0" in plan.render()  # blk.0.v is encoded, not copied

    report = sb.run(source, steps, tmp_path / "o.gguf")
    assert report.stats.tensors_copied_raw == 1
    assert report.stats.bytes_written == plan.bytes_written  # blk.0.v counts as its Q8_0 blocks
    after, before = _tensors(tmp_path / "o.gguf"), _tensors(source)
    assert after["blk.0.w"] == before["blk.0.w"]
    v = GGUFSource(source).load("blk.0.v").numpy()
    assert after["blk.0.v"] == (Q.Q8_0, (64, 4), gguf.quants.quantize(v, Q.Q8_0).tobytes())
    # the source's MOSTLY_Q8_0 still describes the file: as llama-quantize with a per-tensor type keeps it
    assert GGUFSource(tmp_path / "o.gguf").fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_dry_run_lists_the_type_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from statebridge.cli import main

    source = _small(tmp_path / "s.gguf")
    config = tmp_path / "q.yaml"
    config.write_text(f"source: {source}\ntarget: {tmp_path / 'o.gguf'}\nsteps:\n  - quantize: {{\"blk.0.v\": q5_0}}\n")
    assert main(["run", str(config), "--dry-run"]) == 0
    assert "info (plan.types): type change Q4_0 -> Q5_0: 1 tensors, blk.0.v" in capsys.readouterr().out
    assert main(["run", str(config), "--dry-run", "--json"]) == 0
    assert "info (plan.types): type change Q4_0 -> Q5_0: 1 tensors, blk.0.v" in json.loads(capsys.readouterr().out)["findings"]
    assert not (tmp_path / "o.gguf").exists()


def test_config_form_is_the_mapping_or_types_with_strict(tmp_path: Path) -> None:
    source = _small(tmp_path / "s.gguf")
    short = tmp_path / "short.yaml"
    short.write_text(f"source: {source}\nsteps:\n  - quantize: {{\"blk.*.v\": q8_0, norm: BF16}}\n")
    long = tmp_path / "long.yaml"
    long.write_text(f"source: {source}\nsteps:\n  - quantize: {{types: {{\"blk.*.v\": Q8_0, norm: bf16}}, strict: true}}\n")
    spec = {"quantize": {"types": {"blk.*.v": "Q8_0", "norm": "BF16"}, "strict": True}}
    assert sb.load_config(short).pipeline().steps[0].spec() == sb.load_config(long).pipeline().steps[0].spec() == spec
    assert sb.plan(source, sb.load_config(short).pipeline()).fingerprint == sb.plan(source, [spec]).fingerprint


def test_fingerprint_follows_the_types_and_runs_are_byte_identical(tmp_path: Path) -> None:
    source, _ = _floats(tmp_path / "s.safetensors")
    q8, q4 = sb.plan(source, [sb.Quantize({"w": "Q8_0"})]), sb.plan(source, [sb.Quantize({"w": "Q4_0"})])
    assert q8.fingerprint != q4.fingerprint
    assert q8.fingerprint == sb.plan(source, [{"quantize": {"w": "q8_0"}}]).fingerprint
    for name in ("a.gguf", "b.gguf"):
        sb.run(source, [sb.Quantize({"w": "Q8_0"})], tmp_path / name)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


@pytest.mark.parametrize(
    "types, kind, words",
    [
        ({"w": "Q4_K"}, ConfigError, "quantize.types: 'w': the gguf library cannot encode 'Q4_K'; it encodes F32"),
        ({"w": "Q9"}, ConfigError, "cannot encode 'Q9'"),
        ({}, ConfigError, "quantize.types: name at least one pattern"),
        ({"re:(": "Q8_0"}, ConfigError, "is not a valid regular expression"),
    ],
)
def test_bad_types_are_one_line_naming_the_step(types: dict, kind: type, words: str) -> None:
    with pytest.raises(kind) as info:
        sb.Quantize({"types": types})
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "types, words",
    [
        ({"w": "TQ1_0", "norm": "Q8_0"}, "'w' (float32[4, 96]) cannot be stored as TQ1_0: its last dimension must be a multiple of 256"),
        ({"ids": "Q8_0"}, "'ids' (int64[4]) is not floating point"),
        ({"**": "Q8_0", "w": "F16"}, "'w' matches both '**' and 'w'"),
        ({"nothing.*": "Q8_0"}, "pattern 'nothing.*' matches no key"),
    ],
)
def test_what_a_type_cannot_hold_is_refused_naming_the_key(tmp_path: Path, types: dict, words: str) -> None:
    source, _ = _floats(tmp_path / "s.safetensors", cols=96)
    with pytest.raises(PlanError) as info:
        sb.run(source, [sb.Quantize(types)], tmp_path / "o.gguf")
    assert words in str(info.value) and "steps[0] (quantize)" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.gguf").exists()


def test_strict_false_lets_a_pattern_match_nothing(tmp_path: Path) -> None:
    source, _ = _floats(tmp_path / "s.safetensors")
    plan = sb.plan(source, [sb.Quantize(types={"w": "Q8_0", "nothing.*": "Q4_0"}, strict=False)])
    assert [k for k, m in plan.outputs.items() if m.encode] == ["w"]


@pytest.mark.parametrize("target", ["o.safetensors", "o.pt"])
def test_a_block_type_into_a_format_without_it_is_refused_before_any_work(tmp_path: Path, target: str) -> None:
    source, _ = _floats(tmp_path / "s.safetensors")
    with pytest.raises(ConfigError) as info:
        sb.run(source, [sb.Quantize({"w": "Q8_0"})], tmp_path / target)
    message = str(info.value)
    assert message.startswith("quantize: ") and "has no Q8_0 type (1 tensors, e.g. 'w')" in message and "\n" not in message
    assert not (tmp_path / target).exists()


def test_quantize_is_lossy_and_has_no_inverse(tmp_path: Path) -> None:
    source, _ = _floats(tmp_path / "s.safetensors")
    with pytest.raises(NotInvertibleError, match="quantize to Q8_0 loses information; it has no inverse"):
        sb.Quantize({"w": "Q8_0"}).inverse(sb.open_source(source).metas())


def test_planning_a_quantize_imports_no_torch(tmp_path: Path) -> None:
    source = _small(tmp_path / "s.gguf")
    config = tmp_path / "q.yaml"
    config.write_text(f"source: {source}\ntarget: {tmp_path / 'o.gguf'}\nsteps:\n  - quantize: {{\"blk.0.v\": Q8_0}}\n")
    modules, _ = run_cli("plan", str(config))
    assert "torch" not in modules and "gguf.quants" in modules


# -- the real Gemma 3 270M Q4_K_M ----------------------------------------------------------------------

FFN_DOWN = "blk.*.ffn_down.weight"


@pytest.fixture(scope="module")
def quantized(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("quantized") / "gemma-ffn-down-q8.gguf"
    config = target.with_suffix(".yaml")
    config.write_text(f"source: {gemma_path}\ntarget: {target}\nsteps:\n  - quantize: {{{FFN_DOWN!r}: Q8_0}}\n")
    settings = sb.load_config(config)
    sb.run(settings.source, settings.pipeline(), settings.target, progress=False, durable=False)
    return target


def test_gemma_ffn_down_to_q8_0_changes_exactly_those_tensors(gemma_path: Path, quantized: Path) -> None:
    before, after = _stored(gemma_path), _stored(quantized)
    assert set(after) == set(before) and len(after) == 236
    source = GGUFSource(gemma_path)
    changed = [key for key in before if key.endswith(".ffn_down.weight")]
    assert len(changed) == 18 and {before[k][0] for k in changed} == {Q.Q4_K, Q.Q6_K}
    for key, (qtype, shape, data) in before.items():
        if key in changed:
            values = source.load(key).numpy()
            assert after[key] == (Q.Q8_0, shape, gguf.quants.quantize(values, Q.Q8_0).tobytes()), key
        else:
            assert after[key] == (qtype, shape, data), key
    out = GGUFSource(quantized)
    for key, field in source.typed_fields.items():
        assert out.typed_fields[key] == field, key  # every field carried, general.file_type (Q4_K_M) too


def test_gemma_plan_says_which_tensors_change_type(gemma_path: Path) -> None:
    plan = sb.plan(gemma_path, [{"quantize": {FFN_DOWN: "Q8_0"}}])
    found = [str(f) for f in plan.findings if f.check == "plan.types"]
    assert found == [
        "info (plan.types): type change Q6_K -> Q8_0: 9 tensors, blk.{0,1,4,7,10,13,15,16,17}.ffn_down.weight",
        "info (plan.types): type change Q4_K -> Q8_0: 9 tensors, blk.{2,3,5,6,8,9,11,12,14}.ffn_down.weight",
    ]
    assert sorted(k for k, m in plan.outputs.items() if m.encode) == sorted(f"blk.{i}.ffn_down.weight" for i in range(18))


@pytest.mark.slow  # transformers reads each file with gguf.GGUFReader: about two minutes apiece
def test_gemma_with_q8_0_ffn_down_loads_in_transformers_with_close_logits(gemma_path: Path, quantized: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 236764, 1018]])
    logits = []
    for path in (gemma_path, quantized):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits)
        del model
    assert not torch.equal(logits[0], logits[1])  # the ffn_down weights did change
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    assert torch.allclose(torch.softmax(logits[0], -1), torch.softmax(logits[1], -1), atol=2e-2)


def test_loading_into_a_module_refuses_a_block_type(tmp_path: Path) -> None:
    source, values = _floats(tmp_path / "s.safetensors")
    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(4, 256))
    with pytest.raises(ConfigError, match="quantize: module has no Q8_0 type"):
        sb.load_into(model, source, [sb.Quantize({"w": "Q8_0"}), sb.Drop(keys=["norm", "ids"])])
    assert torch.equal(model.w, torch.zeros(4, 256))
    sb.load_into(model, source, [sb.Quantize({"w": "BF16"}), sb.Drop(keys=["norm", "ids"])])  # a dtype: cast on loading
    assert torch.equal(model.w, torch.from_numpy(values).to(torch.bfloat16).float())
