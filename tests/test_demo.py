"""``make demo`` runs examples/demo/demo.py; this keeps it working."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).parents[1] / "examples" / "demo" / "demo.py"


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    env = {**os.environ, "STATEBRIDGE_DEMO_OUT": str(tmp_path / "demo-out")}
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |difference| = 0.0" in result.stdout
    assert "demo passed" in result.stdout
    assert "!=" not in result.stdout
