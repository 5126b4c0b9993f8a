"""torchrun: two ranks share the tensors of a build and rank 0 writes what a sequential build writes, or fail together.

The sequential build runs with two intra-op threads and torchrun's ranks with their default
one: a fit pins itself to one thread, so the bytes do not depend on the thread count
(docs/seeddelta.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import statebridge as sb
from statebridge.testing import LlamaShape, write_llama

sys.path.insert(0, str(Path(__file__).parent))
from torchrun_build import untimed  # noqa: E402

pytestmark = pytest.mark.slow  # each test starts torchrun and two interpreters that import torch: 5-10 s

TORCHRUN = Path(sys.executable).with_name("torchrun")
SCRIPT = Path(__file__).with_name("torchrun_build.py")
LAST = "model.layers.1.mlp.down_proj.weight"  # fitted by rank 1 (the shares are contiguous, in weight order)
#: every base, a stripped weight, and one that autotune tries twice and the gate refuses (unsafe)
POLICY = {"version": 1, "defaults": {"K": 16, "gating": {"min_mean": 0.0}},
          "layers": {"0": {"tensors": {"ffn_up": {"strip": True}}},
                     "1": {"base": "xor_circulant", "tensors": {"ffn_gate": {
                         "gating": {"min_mean": 0.9999}, "autotune": {"enabled": True, "schedule": [4, 8]}}}}}}
ARGS = ["../llama.safetensors", "out.gguf", "--policy", "../policy.json", "--activations"]


def environment(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 llama of two layers, its FFN inputs (and a copy whose last weight's are too narrow), the
    policy, and the sequential build of every FFN weight in ``seq/`` (``out.gguf``, ``report.json``, and what it
    printed on stderr in ``seq.err``)."""
    root = tmp_path_factory.mktemp("sd-dist")
    path = write_llama(root / "llama.safetensors", LlamaShape(layers=2, hidden=64, intermediate=128), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with sb.open_source(path) as src:
        fit = {k: torch.randn(256, m.shape[1], generator=gen) for k, m in src.metas().items() if ".mlp." in k}
    save_file(fit, root / "fit.safetensors")
    save_file({**fit, LAST: torch.randn(256, 7, generator=gen)}, root / "bad.safetensors")
    (root / "policy.json").write_text(json.dumps(POLICY))
    (root / "policy-k8.json").write_text(json.dumps({**POLICY, "defaults": {**POLICY["defaults"], "K": 8}}))
    (root / "seq").mkdir()
    done = subprocess.run([sys.executable, "-m", "statebridge", "seeddelta", "build", *ARGS, "../fit.safetensors",
                           "--report-json", "report.json"], cwd=root / "seq", env=environment(2),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (root / "seq.err").write_text(done.stderr)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 ARGS`` on a free port, so parallel jobs do not collide."""
    command = [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300)


def said(stderr: str) -> list[str]:
    """What statebridge printed on stderr (torchrun's own warnings and failure summary, "statebridge FAILED", left out)."""
    return [line for line in stderr.splitlines() if line.startswith(("statebridge:", "["))]


def test_ranks_write_the_sequential_bytes_and_report(root: Path) -> None:
    (root / "two").mkdir()
    done = torchrun("-m", "statebridge", "seeddelta", "build", *ARGS, "../fit.safetensors",
                    "--report-json", "report.json", cwd=root / "two")
    assert done.returncode == 0, done.stderr
    assert (root / "two" / "out.gguf").read_bytes() == (root / "seq" / "out.gguf").read_bytes()
    report = json.loads((root / "two" / "report.json").read_text())
    expected = json.loads((root / "seq" / "report.json").read_text())
    assert untimed(report) == untimed(expected)
    assert report["summary"]["unsafe"] == ["model.layers.1.mlp.gate_proj.weight"] and report["summary"]["stripped"] == 1
    # rank 0 alone speaks: the sequential build's lines, one per weight in weight order, then one table
    assert said(done.stderr) == (root / "seq.err").read_text().splitlines() and len(said(done.stderr)) == 6
    assert done.stdout.count("seeddelta build: policy") == 1 and done.stdout.count("fitted weights emitted") == 1
    assert sorted(p.name for p in (root / "two").iterdir()) == ["out.gguf", "report.json"]


def test_a_rank_that_fails_ends_the_job_in_one_line_and_leaves_no_target(root: Path) -> None:
    (root / "bad").mkdir()
    done = torchrun("-m", "statebridge", "seeddelta", "build", *ARGS, "../bad.safetensors",
                    "--report-json", "report.json", cwd=root / "bad")
    assert done.returncode != 0
    errors = [line for line in said(done.stderr) if line.startswith("statebridge:")]
    assert errors == [f"statebridge: error: rank 1 of 2 failed: SourceError: ../bad.safetensors: {LAST} is "
                      "[256, 7], expected [n, 128]"], done.stderr
    assert list((root / "bad").iterdir()) == []  # no target, no report, nothing staged
    # An error every rank meets alike is the build's own: one line all the same, with its own exit status.
    done = torchrun("-m", "statebridge", "seeddelta", "build", "../absent.safetensors", "out.gguf", cwd=root / "bad")
    assert done.returncode != 0
    errors = [line for line in said(done.stderr) if line.startswith("statebridge:")]
    assert len(errors) == 1 and errors[0].startswith("statebridge: error: ../absent.safetensors: "), done.stderr
    assert "exitcode  : 2" in done.stderr and list((root / "bad").iterdir()) == []


def test_a_script_under_torchrun_shares_the_build_and_its_failures(root: Path) -> None:
    """Every rank calls ``build()``: they return the same report; a failure is raised on each in the same words."""
    done = torchrun(str(SCRIPT), str(root), "fail", "differ", "unreadable", "missing", "ok", cwd=root)
    assert done.returncode == 0, done.stderr
    seen = {(o["rank"], o["scenario"]): o for o in map(json.loads, done.stdout.splitlines())}
    assert len(seen) == 10
    for scenario, error in [
        ("fail", f"ExecutionError: rank 1 of 2 failed: SourceError: ../bad.safetensors: {LAST} is [256, 7], "
                 "expected [n, 128]"),
        ("differ", "ConfigError: the ranks of this distributed run have different policies (rank 1 differs from rank 0)"),
        ("unreadable", "ExecutionError: rank 1 of 2 failed: ConfigError: ../absent.json: cannot read the policy"),
        ("missing", "SourceError: ../absent.safetensors: "),  # met by every rank alike: the build's own error
    ]:
        for rank in (0, 1):
            assert seen[rank, scenario]["error"].startswith(error), seen[rank, scenario]
        assert list((root / scenario).iterdir()) == []
    # The process group outlived the failures, and the script's build is the command line's.
    assert seen[0, "ok"]["error"] is None and seen[0, "ok"]["digest"] == seen[1, "ok"]["digest"]
    assert (root / "ok" / "out.gguf").read_bytes() == (root / "seq" / "out.gguf").read_bytes()
    assert json.loads((root / "ok" / "report.json").read_text()) == untimed(
        json.loads((root / "seq" / "report.json").read_text()))
