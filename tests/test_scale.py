"""Scale: memory bounds (measured in a subprocess), the memory budget, worker threads, read order, raw copies.

The memory tests run the workload in a fresh interpreter, reset the kernel's
high-water mark once everything is imported and opened, and assert how far
resident memory rose above that baseline (``VmHWM - VmRSS``): importing torch
alone costs about 220 MB, which says nothing about the executor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import statebridge as sb
from statebridge.readers.base import RawSpan, Source
from statebridge.testing import LlamaShape, write_llama

MB = 1024**2
#: about 310 MB in float16: big enough that holding it shows, small enough for CI
SHAPE = LlamaShape(layers=8, hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000)
QKV = sb.Concat(
    inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"], output="model.layers.*.self_attn.qkv_proj.weight"
)
#: slack for the interpreter's own allocations during a run (plans, headers, page tables)
SLACK = 24 * MB

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc for peak RSS")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("scale") / "llama.safetensors", SHAPE, dtype=torch.float16)


def peak_rise(setup: str, work: str) -> dict:
    """Run ``setup`` then ``work`` in a fresh interpreter; return the rise of peak RSS during ``work``.

    ``work`` may set ``result`` (a dict) to report more.
    """
    script = "\n".join(
        [
            "import json",
            textwrap.dedent(setup),
            "def _status(field):",
            "    with open('/proc/self/status') as f:",
            "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))",
            "result = {}",
            "open('/proc/self/clear_refs', 'w').write('5')",  # peak := current
            "_base = _status('VmRSS')",
            textwrap.dedent(work),
            "print(json.dumps({'rise': _status('VmHWM') - _base, 'base': _base, **result}))",
        ]
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


SETUP = """
    import torch, statebridge as sb
    from statebridge.plugins import load_plugins
    load_plugins()
    source = sb.open_source({path!r})
    qkv = sb.Concat(inputs=[f"model.layers.*.self_attn.{{x}}_proj.weight" for x in "qkv"],
                    output="model.layers.*.self_attn.qkv_proj.weight")
"""


def test_rename_only_copies_raw_bytes_in_constant_memory(checkpoint, tmp_path):
    measured = peak_rise(
        SETUP.format(path=str(checkpoint)),
        f"""
        report = sb.run(source, [sb.Rename(pattern="model.**", to="**")], {str(tmp_path / "out.safetensors")!r}, progress=False)
        result = {{"written": report.stats.tensors_written, "raw": report.stats.tensors_copied_raw}}
        """,
    )
    assert measured["written"] == 0 and measured["raw"] == len(list(SHAPE.tensors()))
    assert measured["rise"] < SLACK, measured  # the checkpoint is 310 MB; nothing of it is held


def test_qkv_fusion_copies_raw_bytes_in_constant_memory(checkpoint, tmp_path):
    """Concatenated along their first dimension, q, k and v are byte ranges of the source: no decoding."""
    measured = peak_rise(
        SETUP.format(path=str(checkpoint)),
        f"""
        report = sb.run(source, [qkv], {str(tmp_path / "out.safetensors")!r}, progress=False)
        result = {{"written": report.stats.tensors_written, "raw": report.stats.tensors_copied_raw}}
        """,
    )
    assert measured["written"] == 0 and measured["raw"] == len(list(SHAPE.tensors())) - 2 * SHAPE.layers
    assert measured["rise"] < SLACK, measured
    with safe_open(tmp_path / "out.safetensors", "pt") as out:
        fused = out.get_tensor("model.layers.2.self_attn.qkv_proj.weight")
    source = load_file(checkpoint)
    parts = [source[f"model.layers.2.self_attn.{x}_proj.weight"] for x in "qkv"]
    assert torch.equal(fused, torch.cat(parts))


@pytest.mark.parametrize(
    "steps",
    ["[qkv, sb.Cast(pattern='**.qkv_proj.weight', dtype='fp32')]", "[sb.Cast(dtype='fp32')]"],
    ids=["qkv-fusion-then-cast", "cast-everything"],
)
def test_computed_groups_stay_within_two_groups(checkpoint, tmp_path, steps):
    plan = sb.plan(checkpoint, eval(steps, {"sb": sb, "qkv": QKV}))
    metas = plan.source.metas()
    largest = max(
        sum(metas[k].nbytes for k in g.inputs) + sum(m.nbytes for m in g.outputs.values())
        for g in plan.groups
        if len(plan.raw_spans(g)) < len(g.outputs)
    )
    measured = peak_rise(
        SETUP.format(path=str(checkpoint)),
        f"report = sb.run(source, {steps}, {str(tmp_path / 'out')!r}, shard_size=100_000_000, progress=False)",
    )
    assert measured["rise"] <= 2 * largest + SLACK, (measured, largest)
    assert measured["rise"] < plan.bytes_written / 2  # far from holding the output


MODULE = """
    from torch import nn

    def module_like(metas, device="meta"):
        '''A module with a parameter for each key (nested by dots), on ``device``, uninitialised.'''
        root = nn.Module()
        for key, meta in metas.items():
            *path, name = key.split(".")
            owner = root
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(name, nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype.torch, device=device)))
        return root
"""


def test_load_into_meta_model_maps_the_file_and_costs_nothing(checkpoint):
    measured = peak_rise(
        SETUP.format(path=str(checkpoint)) + MODULE + "\n    model = module_like(source.metas())",
        """
        sb.load_into(model, source)
        q = model.get_parameter("model.layers.3.self_attn.q_proj.weight")
        result = {"equal": bool(torch.equal(q, source.load("model.layers.3.self_attn.q_proj.weight"))),
                  "meta": any(p.is_meta for p in model.parameters())}
        """,
    )
    assert measured["equal"] and not measured["meta"]
    assert measured["rise"] < SLACK, measured  # parameters are views of the file, read when used


def test_load_into_with_fusion_holds_the_model_and_one_group(checkpoint):
    fused = sb.plan(checkpoint, [QKV])
    metas = fused.source.metas()
    # a module takes tensors, not bytes: the fused weights are computed (the rest is mapped)
    fusions = [g for g in fused.groups if len(g.inputs) > 1]
    computed = sum(m.nbytes for g in fusions for m in g.outputs.values())
    largest = max(sum(metas[k].nbytes for k in g.inputs) * 2 for g in fusions)
    measured = peak_rise(
        SETUP.format(path=str(checkpoint)) + MODULE + "\n    model = module_like(sb.plan(source, [qkv]).outputs)",
        """
        sb.load_into(model, source, [qkv])
        result = {"fused": list(model.get_parameter("model.layers.0.self_attn.qkv_proj.weight").shape)}
        """,
    )
    assert measured["fused"] == [SHAPE.hidden + 2 * SHAPE.kv_heads * SHAPE.head_dim, SHAPE.hidden]
    # computed tensors are the model's own memory; everything else stays mapped from the file
    assert measured["rise"] <= computed + largest + SLACK, (measured, computed, largest)


def test_load_into_allocated_model_copies_group_by_group(checkpoint):
    size = sum(m.nbytes for m in sb.open_source(checkpoint).metas().values())
    measured = peak_rise(
        SETUP.format(path=str(checkpoint)) + MODULE + "\n    model = module_like(source.metas(), device='cpu')",
        """
        sb.load_into(model, source)
        result = {"equal": bool(torch.equal(model.lm_head.weight, source.load("lm_head.weight")))}
        """,
    )
    assert measured["equal"]
    # the model's pages become resident as they are filled; the largest group (the embedding) passes through
    largest = SHAPE.vocab * SHAPE.hidden * 2
    assert measured["rise"] <= size + largest + SLACK, (measured, size)


def test_group_over_the_budget_runs_alone_with_a_warning(checkpoint, tmp_path):
    steps = [QKV, sb.Cast(pattern="lm_head.weight", dtype="fp32")]
    sb.run(checkpoint, steps, tmp_path / "default.safetensors", progress=False)
    with pytest.warns(RuntimeWarning, match=r"group \[lm_head.weight\] -> \[lm_head.weight\] needs 196.6 MB in memory, more than the budget of 10.5 MB; running it alone"):
        report = sb.run(checkpoint, steps, tmp_path / "small.safetensors", progress=False, max_memory=10 * MB, workers=2)
    assert report.stats.budget == 10 * MB
    assert (tmp_path / "small.safetensors").read_bytes() == (tmp_path / "default.safetensors").read_bytes()


def test_workers_give_the_same_bytes_within_the_budget(checkpoint, tmp_path):
    steps = [QKV, sb.Cast(pattern="model.layers.*.mlp.*.weight", dtype="bf16")]
    one = sb.run(checkpoint, steps, tmp_path / "one", shard_size=50_000_000, progress=False)
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every group fits: no warning
        three = sb.run(checkpoint, steps, tmp_path / "three", shard_size=50_000_000, progress=False, workers=3, max_memory=60 * MB)
    assert torch.get_num_threads() == threads  # intra-op threads are given back
    # several groups in flight at once, never more than the budget
    assert one.stats.peak_in_flight < three.stats.peak_in_flight <= 60 * MB
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "three").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


class Recording(Source):
    """Wraps a source: records the offset of every tensor decoded, or refuses to decode any."""

    def __init__(self, inner: Source, decode: bool = True) -> None:
        self.inner, self.name, self.decode = inner, inner.name, decode
        self.offsets: list[int] = []

    def metas(self):
        return self.inner.metas()

    def raw_span(self, key: str) -> RawSpan | None:
        return self.inner.raw_span(key)

    def load(self, key: str) -> torch.Tensor:
        if not self.decode:
            raise AssertionError(f"{key} was decoded")
        self.offsets.append(self.inner.raw_span(key).offset)
        return self.inner.load(key)


def test_each_source_file_is_read_front_to_back(checkpoint, tmp_path):
    source = Recording(sb.open_source(checkpoint))
    gate_up = sb.Concat(inputs=["model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"], output="model.layers.*.mlp.gate_up_proj.weight")
    sb.run(source, [QKV, gate_up, sb.Cast(dtype="bf16")], tmp_path / "out", shard_size=40_000_000, progress=False)
    assert len(source.offsets) == len(source.metas()) and source.offsets == sorted(source.offsets)


def test_renamed_and_moved_tensors_are_never_decoded(checkpoint, tmp_path):
    source = Recording(sb.open_source(checkpoint), decode=False)
    report = sb.run(source, [sb.Rename(pattern="model.**", to="**")], tmp_path / "out", shard_size=30_000_000, progress=False)
    assert report.stats.tensors_written == 0 and len(report.files) > 5  # moved into shards of another layout
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    out = load_file(tmp_path / "out" / index["weight_map"]["layers.7.mlp.up_proj.weight"])
    assert torch.equal(out["layers.7.mlp.up_proj.weight"], sb.open_source(checkpoint).load("model.layers.7.mlp.up_proj.weight"))


def test_budget_and_workers_are_checked(tmp_path):
    with pytest.raises(sb.ConfigError, match="^workers: Input should be greater than or equal to 1$"):
        sb.run({"w": torch.ones(2)}, None, tmp_path / "out.safetensors", workers=0)
    with pytest.raises(sb.ConfigError, match="^max_memory: size -1 is less than one byte"):
        sb.run({"w": torch.ones(2)}, None, tmp_path / "out.safetensors", max_memory=-1)
    assert list(tmp_path.iterdir()) == []
