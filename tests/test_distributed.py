"""Distributed runs: two torchrun processes on this machine write what one process writes, and fail together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from statebridge.execute.distributed import split
from statebridge.testing import LlamaShape, write_llama

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("torchrun_worker.py")
CONFIG = {
    "source": "src",
    "shard_size": "150KB",
    "steps": [
        {"concat": {"inputs": [f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"], "output": "model.layers.*.self_attn.qkv_proj.weight"}},
        {"cast": {"pattern": "model.layers.*.mlp.**", "dtype": "bf16"}},
        {"rename": {"pattern": "model.**", "to": "**"}},
    ],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A sharded llama-style checkpoint (1.3 MB, 39 tensors) and a config that fuses, casts and renames it."""
    root = tmp_path_factory.mktemp("dist")
    write_llama(root / "src", LlamaShape(layers=4, hidden=128, intermediate=256), shard_size=200_000)
    (root / "fuse.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port, so parallel jobs do not collide)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_processes_write_byte_identical_output(workdir):
    one = subprocess.run(
        [sys.executable, "-m", "statebridge", "run", "fuse.yaml", "--target", "one", "--no-progress"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "statebridge", "run", "fuse.yaml", "--target", "two", "--no-progress", cwd=workdir)
    assert two.returncode == 0, two.stderr
    expected = files(workdir / "one")
    assert len(expected) > 5 and "model.safetensors.index.json" in expected
    assert files(workdir / "two") == expected
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]  # no staging left behind
    # rank 0 alone prints the plan and the report, which counts both processes
    assert two.stdout.count("plan for ") == 1 and two.stdout.count("wrote ") == 1, two.stdout
    assert "per process, 2 processes" in two.stdout


def outcomes(result: subprocess.CompletedProcess[str]) -> dict[tuple[int, str], dict]:
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {(o["rank"], o["scenario"]): o for o in lines}


def test_ranks_share_the_work_and_fail_together(workdir):
    out = workdir / "scenarios"
    out.mkdir()
    result = torchrun(str(WORKER), str(workdir / "src"), str(out), "ok", "fail", "targets", "torch", "ok", cwd=workdir)
    assert result.returncode == 0, result.stderr
    seen = outcomes(result)
    for rank in (0, 1):
        assert seen[rank, "ok"]["error"] is None
        assert seen[rank, "ok"]["files"][-1].endswith("model.safetensors.index.json")
        # A rank that fails takes the run down on every rank, naming itself.
        assert seen[rank, "fail"]["error"] in (
            "RuntimeError: disk on fire on rank 1",
            "ExecutionError: rank 1 of 2 failed: RuntimeError: disk on fire on rank 1",
        )
        assert seen[rank, "targets"]["error"].startswith("ConfigError: the ranks of this distributed run have different targets")
        assert "ConfigError: the torch writer cannot be written by several processes" in seen[rank, "torch"]["error"]
    assert seen[1, "fail"]["error"].startswith("RuntimeError") and seen[0, "fail"]["error"].startswith("ExecutionError")
    # Failed runs leave nothing, not even staging folders; the process group survives them.
    assert sorted(p.name for p in out.iterdir()) == ["ok"]
    single = subprocess.run([sys.executable, str(WORKER), str(workdir / "src"), str(workdir / "single"), "ok"], timeout=300)
    assert single.returncode == 0
    assert files(out / "ok") == files(workdir / "single" / "ok")


def test_a_rank_that_dies_takes_the_run_down_cleanly(workdir):
    out = workdir / "dies"
    out.mkdir()
    result = torchrun(str(WORKER), str(workdir / "src"), str(out), "die", cwd=workdir)
    assert result.returncode != 0
    assert "lost contact with the other ranks" in result.stdout + result.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "work, parts, expected",
    [
        ([1] * 6, 2, [range(0, 3), range(3, 6)]),
        ([1, 1, 1, 1, 4], 2, [range(0, 4), range(4, 5)]),
        ([5, 1, 1, 1, 1, 1], 2, [range(0, 1), range(1, 6)]),
        ([1, 1], 4, [range(0, 0), range(0, 1), range(1, 1), range(1, 2)]),
        ([], 3, [range(0, 0)] * 3),
        ([0, 0, 0], 2, [range(0, 3), range(3, 3)]),
    ],
)
def test_split_is_contiguous_and_balanced(work, parts, expected):
    assert split(work, parts) == expected


def test_split_is_within_one_item_of_an_even_share():
    work = [(i * 7919) % 97 + 1 for i in range(500)]
    ranges = split(work, 7)
    assert [i for r in ranges for i in r] == list(range(500))
    share, largest = sum(work) / 7, max(work)
    assert all(abs(sum(work[i] for i in r) - share) <= largest for r in ranges)


def test_declared_effort_weighs_a_group_for_sharing(tmp_path):
    """A transform that computes far more per byte than a cast says so (``effort``), and ranks share by it."""
    import torch

    import statebridge as sb
    from statebridge.execute.executor import work

    source = {"a": torch.ones(64, 64), "b": torch.ones(64, 64)}

    class Heavy(sb.Transform):
        class Params(sb.Params):
            pass

        def plan(self, metas):
            return [sb.Group.map_one("a", "a", metas["a"], lambda x: x @ x, "square", effort=50)]

    plain = sb.plan(source, [sb.Cast(pattern="b", dtype="bf16")])
    heavy = sb.plan(source, [Heavy(), sb.Cast(pattern="a", dtype="bf16")])
    cast_work = {g.inputs: work(plain, g) for g in plain.groups}[("b",)]
    merged = {g.inputs: g for g in heavy.groups}[("a",)]  # the square and the cast, one group
    assert merged.passes == 51  # 50 declared + 1 for the cast
    assert work(heavy, merged) == 51 * cast_work  # same bytes in and out (float32 -> bfloat16), 51 times the passes
