"""Header-only work never imports torch: planning, inspecting, dry runs and raw-copy runs.

Importing torch alone takes about 220 MB of resident memory and over a second, so a
rename-only conversion that imported it could not stay under issue 4's bound of 200 MB for
the whole process. These tests run the real command line in a fresh interpreter with
``-X importtime`` (which lists every module the process imported) and measure the child's
own peak resident memory with ``os.wait4``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from statebridge.testing import LlamaShape, write_llama

MB = 1024**2
#: about 310 MB in float16, as in test_scale.py: holding it would show
SHAPE = LlamaShape(layers=8, hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("torch-free") / "llama.safetensors", SHAPE, dtype=torch.float16)


#: runs the command line, then reports the process's own high-water mark of resident memory (VmHWM
#: belongs to the new program image; rusage would also count the parent's pages it was forked with)
CLI = """
import atexit, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        sys.stderr.write(next(line for line in f if line.startswith("VmHWM:")))
atexit.register(_peak)
sys.argv = ["statebridge", *sys.argv[1:]]
runpy.run_module("statebridge", run_name="__main__")
"""


def run_cli(*args: str) -> tuple[set[str], int]:
    """Run the command line in a fresh interpreter; return the modules it imported and its peak RSS in bytes."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", CLI, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "statebridge" in modules, "-X importtime listed nothing"
    peak_kb = next(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return modules, peak_kb * 1024


def write_config(path: Path, source: Path, target: Path, step: str) -> Path:
    path.write_text(f"source: {source}\ntarget: {target}\nsteps:\n  - {step}\n")
    return path


def test_importing_statebridge_and_its_plugins_does_not_import_torch():
    script = (
        "import pkgutil, sys, importlib, statebridge\n"
        "for m in pkgutil.walk_packages(statebridge.__path__, 'statebridge.'):\n"
        "    if m.name not in ('statebridge.testing', 'statebridge.__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "from statebridge.plugins import load_plugins\n"
        "print(sorted(p.name for p in load_plugins().info))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plugins, torch_modules = done.stdout.splitlines()[-2:]
    assert "example_scale" in plugins, plugins  # the third-party example plugin is loaded too
    assert torch_modules == "[]"


def test_rename_only_run_never_imports_torch_and_stays_under_200_mb(checkpoint, tmp_path):
    target = tmp_path / "out.safetensors"
    config = write_config(tmp_path / "rename.yaml", checkpoint, target, "rename: {pattern: 'model.**', to: '**'}")
    modules, peak = run_cli("run", str(config), "--no-progress")
    assert "torch" not in modules
    assert peak < 200 * MB, f"peak RSS {peak / MB:.0f} MB"  # issue 4's bound, for the whole process
    with safe_open(target, "pt") as out, safe_open(checkpoint, "pt") as source:
        assert set(out.keys()) == {k.removeprefix("model.") for k in source.keys()}
        assert torch.equal(out.get_tensor("embed_tokens.weight"), source.get_tensor("model.embed_tokens.weight"))


def test_inspect_plan_and_dry_run_never_import_torch(checkpoint, tmp_path):
    config = write_config(
        tmp_path / "cast.yaml", checkpoint, tmp_path / "never.safetensors", "cast: {dtype: bf16}"
    )  # a computed transform: planning it still needs no torch
    for args in (["inspect", str(checkpoint)], ["plan", str(config)], ["run", str(config), "--dry-run"]):
        modules, _ = run_cli(*args)
        assert "torch" not in modules, args
    assert not (tmp_path / "never.safetensors").exists()


def test_planning_with_every_plugin_imports_neither_torch_nor_numpy(checkpoint):
    """``sb.plan`` registers every installed plugin's transforms: none may bring numpy (about 12 MB)
    or torch in.  The analysis plugin's ``permute_rows`` once did (through its content module), and a
    200,000-tensor plan crossed its 300 MB bound."""
    script = (
        "import sys, statebridge as sb\n"
        f"sb.plan({str(checkpoint)!r}, [{{'cast': {{'dtype': 'bf16'}}}}, {{'permute_rows': {{'pattern': 'none.*', 'order': [0], 'strict': False}}}}])\n"
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"


def test_a_computed_run_does_import_torch(checkpoint, tmp_path):
    """The check above is not vacuous: a run that computes tensors is seen importing torch."""
    config = write_config(tmp_path / "cast.yaml", checkpoint, tmp_path / "cast.safetensors", "cast: {dtype: bf16}")
    modules, _ = run_cli("run", str(config), "--no-progress")
    assert "torch" in modules
