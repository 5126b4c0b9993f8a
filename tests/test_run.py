"""Running plans into files and modules: streaming, raw copies, shards, atomicity, determinism, gates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import statebridge as sb
from statebridge import ExecutionError, GateRejectedError, PlanError
from statebridge.testing import LlamaShape, write_llama

QKV = dict(
    inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
    output="model.layers.*.self_attn.qkv_proj.weight",
)


def digest(path: Path) -> str:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def test_run_to_single_file_matches_the_transform(tmp_path, llama_file, llama_sd):
    report = sb.run(llama_file, [sb.Concat(**QKV)], tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    p = "model.layers.0.self_attn."
    assert torch.equal(out[p + "qkv_proj.weight"], torch.cat([llama_sd[p + f"{x}_proj.weight"] for x in "qkv"]))
    assert report.stats.tensors_copied_raw == len(llama_sd) - 4  # q, k, v -> qkv in two layers; all raw bytes
    assert report.stats.tensors_written == 0
    assert report.files == [tmp_path / "out.safetensors"]
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"


BYTE_RANGES = {
    "concat": [sb.Concat(**QKV)],
    "concat-then-split": [sb.Concat(**QKV), sb.Split(
        input="model.layers.*.self_attn.qkv_proj.weight",
        outputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
        sizes=[64, 32, 32],
    )],
    "chunk": [sb.Chunk(input="model.layers.*.mlp.up_proj.weight", outputs=["model.layers.*.mlp.up_a", "model.layers.*.mlp.up_b"])],
    "stack": [sb.Stack(inputs=["model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"], output="model.layers.*.mlp.gate_up")],
    "stack-then-unstack": [
        sb.Stack(inputs=["model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"], output="model.layers.*.mlp.gate_up"),
        sb.Unstack(input="model.layers.*.mlp.gate_up", outputs=["model.layers.*.mlp.g", "model.layers.*.mlp.u"]),
    ],
    "reshape-then-rename": [sb.Reshape(pattern="model.norm.weight", shape=[2, -1]), sb.Rename(mapping={"model.norm.weight": "norm"})],
}


@pytest.mark.parametrize("name", list(BYTE_RANGES))
def test_outputs_that_are_byte_ranges_of_the_source_are_copied_raw(tmp_path, llama_file, llama_sd, name):
    """Concatenations, splits, stacks and reshapes along the outermost dimension move no bytes around:
    the writer copies them from the file, and the result equals what torch computes."""
    steps = BYTE_RANGES[name]
    report = sb.run(llama_file, steps, tmp_path / "raw.safetensors")
    sb.run(llama_sd, steps, tmp_path / "computed.safetensors")  # a dict has no file to copy from
    assert report.stats.tensors_written == 0 and report.stats.tensors_copied_raw == len(report.plan.outputs)
    raw, computed = load_file(tmp_path / "raw.safetensors"), load_file(tmp_path / "computed.safetensors")
    assert raw.keys() == computed.keys() and all(torch.equal(raw[k], computed[k]) for k in raw)


def test_a_concatenation_along_an_inner_dimension_is_computed(tmp_path, llama_file, llama_sd):
    steps = [sb.Concat(inputs=["model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"],
                       output="model.layers.*.mlp.gate_up", dim=1)]
    report = sb.run(llama_file, steps, tmp_path / "out.safetensors")
    assert report.stats.tensors_written == 2  # one per layer, computed by torch.cat
    p = "model.layers.1.mlp."
    expected = torch.cat([llama_sd[p + "gate_proj.weight"], llama_sd[p + "up_proj.weight"]], dim=1)
    assert torch.equal(load_file(tmp_path / "out.safetensors")[p + "gate_up"], expected)


def test_cut_takes_byte_ranges_across_pieces():
    from statebridge.transforms.base import Piece, cut

    pieces = (Piece("a", 10, 4), Piece("b", 0, 6))
    assert cut(pieces, 0, 10) == pieces
    assert cut(pieces, 2, 5) == (Piece("a", 12, 2), Piece("b", 0, 3))
    assert cut(pieces, 4, 6) == (Piece("b", 0, 6),)
    assert cut(pieces, 9, 1) == (Piece("b", 5, 1),)


def test_sharded_output_with_index(tmp_path, llama_file, llama_sd):
    sb.run(llama_file, None, tmp_path / "out", shard_size=100_000, metadata={"note": "x"})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and len(shards) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in llama_sd.values())
    for name in shards:
        assert (tmp_path / "out" / name).stat().st_size <= 100_000 + 8 + 4096 or len(load_file(tmp_path / "out" / name)) == 1
    reread = sb.open_source(tmp_path / "out")
    assert list(reread.metas()) == list(sb.open_source(llama_file).metas())
    assert all(torch.equal(reread.load(k), v) for k, v in llama_sd.items())
    assert reread.metadata["note"] == "x"


def test_single_shard_folder_is_model_safetensors(tmp_path, llama_file):
    sb.run(llama_file, None, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_same_config_gives_byte_identical_output(tmp_path, llama_file):
    steps = [sb.Concat(**QKV), sb.Cast(dtype="bf16")]
    sb.run(llama_file, steps, tmp_path / "a", shard_size=50_000)
    sb.run(llama_file, steps, tmp_path / "b", shard_size=50_000)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_torch_and_gguf_targets(tmp_path, llama_file, llama_sd):
    sb.run(llama_file, None, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in llama_sd.items())
    sb.run(llama_file, [sb.Cast(dtype="fp16")], tmp_path / "out.gguf", metadata={"general.name": "tiny"})
    back = sb.open_source(tmp_path / "out.gguf")
    assert all(torch.equal(back.load(k), v.half()) for k, v in llama_sd.items())


def test_unknown_format_is_a_clear_error(tmp_path, llama_file):
    with pytest.raises(sb.ConfigError, match="no writer for format 'onnx'; installed formats: gguf, safetensors, torch"):
        sb.run(llama_file, None, tmp_path / "x", format="onnx")


class Boom(sb.Transform):
    """A transform that fails while computing its third group."""

    name = "boom"

    def plan(self, metas):
        groups = []
        for i, key in enumerate(metas):
            def compute(t, key=key, i=i):
                if i == 2:
                    raise RuntimeError("disk on fire")
                return {key: t[key] * 2}
            groups.append(sb.Group(inputs=(key,), outputs={key: metas[key]}, compute=compute, ops=("boom",)))
        return groups


@pytest.mark.parametrize("target_name", ["out.safetensors", "out"])
def test_failed_run_leaves_no_target_and_no_temp_files(tmp_path, llama_file, target_name):
    with pytest.raises(RuntimeError, match="disk on fire"):
        sb.run(llama_file, [Boom()], tmp_path / target_name, shard_size=50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [llama_file.name]


def test_failed_run_leaves_an_existing_target_untouched(tmp_path, llama_file):
    target = tmp_path / "out"
    sb.run(llama_file, None, target, shard_size=50_000)
    before = digest(target)
    source_before = digest(llama_file)
    with pytest.raises(RuntimeError):
        sb.run(llama_file, [Boom()], target, shard_size=50_000)
    assert digest(target) == before and digest(llama_file) == source_before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([llama_file.name, "out"])


def test_successful_run_replaces_an_existing_target(tmp_path, llama_file):
    target = tmp_path / "out"
    sb.run(llama_file, None, target, shard_size=50_000)
    sb.run(llama_file, [sb.Cast(dtype="fp16")], target)
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]


def test_transform_that_lies_about_its_output_is_caught(tmp_path, llama_file):
    class Liar(sb.Transform):
        name = "liar"

        def plan(self, metas):
            key = "lm_head.weight"
            return [sb.Group.map_one(key, key, metas[key], lambda x: x[:1], "liar")]

    with pytest.raises(ExecutionError, match=r"steps\[0\] \(liar\): produced 'lm_head.weight' as float32\[1, 64\] but planned float32\[256, 64\]"):
        sb.run(llama_file, [Liar()], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_finite_gate_rejects_nan(tmp_path, llama_file):
    steps = [sb.ValueOp(pattern="model.norm.weight", op="scale", args={"factor": float("nan")})]
    sb.run(llama_file, steps, tmp_path / "ok.safetensors")  # gates are opt-in
    with pytest.raises(GateRejectedError, match="'model.norm.weight': every candidate was rejected: output: finite rejected \\(64 non-finite values\\)"):
        sb.run(llama_file, steps, tmp_path / "out.safetensors", gates={"finite": True})
    assert not (tmp_path / "out.safetensors").exists()


def test_candidates_fall_back_to_the_first_accepted(tmp_path, llama_file):
    class Offer(sb.Transform):
        name = "offer"

        def plan(self, metas):
            key = "model.norm.weight"

            def compute(t):
                return {key: sb.Candidates([t[key] * float("nan"), t[key] * 3], ["nan", "tripled"])}

            return [sb.Group(inputs=(key,), outputs={key: metas[key]}, compute=compute, ops=("offer",))]

    report = sb.run(llama_file, [Offer()], tmp_path / "out.safetensors", gates={"finite": True})
    assert [(r.key, r.chosen) for r in report.stats.gate_records] == [("model.norm.weight", "tripled")]
    assert torch.all(load_file(tmp_path / "out.safetensors")["model.norm.weight"] == 3)


class TinyLlamaAttention(torch.nn.Module):
    """A module that expects the fused qkv layout."""

    def __init__(self, shape: LlamaShape, dtype=torch.float32):
        super().__init__()
        kv = shape.kv_heads * shape.head_dim
        self.layers = torch.nn.ModuleList()
        for _ in range(shape.layers):
            layer = torch.nn.Module()
            layer.qkv = torch.nn.Linear(shape.hidden, shape.hidden + 2 * kv, bias=False, dtype=dtype)
            layer.register_buffer("scale", torch.ones(shape.hidden, dtype=dtype))
            self.layers.append(layer)


FUSE_INTO_MODULE = [
    sb.Concat(**QKV),
    sb.Rename(pattern="model.layers.*.self_attn.qkv_proj.weight", to="layers.*.qkv.weight"),
    sb.Rename(pattern="model.layers.*.input_layernorm.weight", to="layers.*.scale"),
    sb.Drop(keys=["model.layers.*.self_attn.o_proj.weight", "model.layers.*.mlp.*.weight", "model.layers.*.post_attention_layernorm.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]),
]


def test_load_into_module_in_place_and_cast(llama_file, llama_sd):
    model = TinyLlamaAttention(LlamaShape(layers=2), dtype=torch.bfloat16)
    sb.load_into(model, llama_file, FUSE_INTO_MODULE)
    p = "model.layers.1.self_attn."
    expected = torch.cat([llama_sd[p + f"{x}_proj.weight"] for x in "qkv"]).bfloat16()
    assert torch.equal(model.layers[1].qkv.weight.data, expected)


def test_load_into_meta_module_assigns_tensors(llama_file, llama_sd):
    with torch.device("meta"):
        model = TinyLlamaAttention(LlamaShape(layers=2))
    sb.load_into(model, llama_file, FUSE_INTO_MODULE)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert isinstance(model.layers[0].qkv.weight, torch.nn.Parameter) and model.layers[0].qkv.weight.requires_grad
    assert torch.equal(model.layers[0].scale, llama_sd["model.layers.0.input_layernorm.weight"])


def test_load_into_reports_missing_unexpected_and_shape_errors_before_reading(llama_file):
    model = TinyLlamaAttention(LlamaShape(layers=2))
    with pytest.raises(PlanError) as e:
        sb.load_into(model, llama_file, FUSE_INTO_MODULE[:2])
    message = str(e.value)
    assert "15 keys the module does not have: " in message and "model.embed_tokens.weight" in message
    assert "module keys the pipeline does not produce: layers.{0..1}.scale" in message
    small = TinyLlamaAttention(LlamaShape(layers=2, kv_heads=1))
    with pytest.raises(PlanError, match=r"'layers.0.qkv.weight': the pipeline makes float32\[128, 64\] but the module expects \[96, 64\]"):
        sb.load_into(small, llama_file, FUSE_INTO_MODULE)


def test_load_into_warns_about_tensors_left_on_meta(llama_file):
    with torch.device("meta"):
        model = TinyLlamaAttention(LlamaShape(layers=2))
    model.layers[0].register_buffer("cache", torch.empty(3, device="meta"), persistent=False)
    with pytest.warns(RuntimeWarning, match="still on the meta device.*layers.0.cache"):
        sb.load_into(model, llama_file, FUSE_INTO_MODULE)


def test_generated_checkpoint_is_deterministic(tmp_path):
    write_llama(tmp_path / "a", LlamaShape(layers=3), shard_size=30_000)
    write_llama(tmp_path / "b", LlamaShape(layers=3), shard_size=30_000)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_a_zero_byte_tensor_renamed_by_several_steps_is_written(tmp_path):
    """A zero-byte tensor's pieces are an empty tuple: composition must not take them for a source tensor's marker."""
    from safetensors.torch import save_file

    source = tmp_path / "z.safetensors"
    save_file({"e": torch.zeros(0, 4), "x": torch.ones(2)}, str(source))
    steps = [{"rename": {"mapping": {"e": "f"}}}, {"rename": {"mapping": {"f": "g"}}}, {"rename": {"mapping": {"g": "h"}}}]
    plan = sb.plan(source, steps)
    assert plan.lineage["h"].sources == ("e",)
    report = sb.run(source, steps, tmp_path / "out.safetensors")
    written = load_file(str(tmp_path / "out.safetensors"))
    assert set(written) == {"h", "x"} and written["h"].shape == (0, 4)
    assert torch.equal(written["x"], torch.ones(2))
    assert report.stats.tensors_copied_raw == 2
