"""The distributions as users get them: wheels installed into fresh virtual environments.

Builds every wheel once (the same commands as ``make wheels``), then installs
``statebridge``, ``statebridge[seeddelta]`` and ``statebridge[all]`` into fresh
venvs (no system site-packages) and checks that ``statebridge plugins --json``
lists exactly the plugins each brings, and that installing the third-party
example wheel adds it.  torch is installed first, pinned, from the local wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
VERSION = "0.1.0"
PLUGINS = {"lora", "progressive", "seeddelta", "analysis"}
# the same distributions as the Makefile's DISTRIBUTIONS
PROJECTS = [ROOT, *sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml")), ROOT / "examples" / "third_party_plugin"]


def _env() -> dict[str, str]:
    """The environment without anything that would make the fresh venv see this one or filter plugins."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("STATEBRIDGE_")}


def _run(*args: object, cwd: Path | None = None) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="building wheels needs the 'build' package (make venv installs it)")
    out = tmp_path_factory.mktemp("dist")
    for project in PROJECTS:
        shutil.rmtree(project / "build", ignore_errors=True)  # setuptools never prunes it: stale modules would ship
        _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, project)
    names = sorted(p.name.split("-")[0] for p in out.glob("*.whl"))
    expected = ["statebridge", *sorted(f"statebridge_{p}" for p in PLUGINS | {"example_scale"})]
    assert names == sorted(expected), names
    return out


class Venv:
    def __init__(self, path: Path, dist: Path) -> None:
        self.path, self.dist = path, dist
        _run(sys.executable, "-m", "venv", path)
        self.pip("install", TORCH)

    def pip(self, *args: str) -> None:
        _run(self.path / "bin" / "python", "-m", "pip", "--no-input", *args)

    def install(self, *requirements: str) -> None:
        # torch pinned again so the resolver can never pick another build
        self.pip("install", "--find-links", str(self.dist), TORCH, *requirements)

    def plugins(self) -> set[str]:
        listed = json.loads(_run(self.path / "bin" / "statebridge", "plugins", "--json", cwd=self.path))
        assert all(p["error"] is None for p in listed), listed
        return {p["name"] for p in listed}


def test_core_alone_then_the_example_plugin(dist: Path, tmp_path: Path) -> None:
    venv = Venv(tmp_path / "venv", dist)
    venv.install(f"statebridge=={VERSION}")
    assert venv.plugins() == {"statebridge"}
    venv.install(f"statebridge-example-scale=={VERSION}")  # a third-party wheel: adds itself, nothing else
    assert venv.plugins() == {"statebridge", "example_scale"}


@pytest.mark.parametrize(("extra", "brings"), [("seeddelta", {"seeddelta"}), ("all", PLUGINS)])
def test_extra_installs_exactly_its_plugins(dist: Path, tmp_path: Path, extra: str, brings: set[str]) -> None:
    venv = Venv(tmp_path / "venv", dist)
    venv.install(f"statebridge[{extra}]=={VERSION}")
    assert venv.plugins() == {"statebridge", *brings}
