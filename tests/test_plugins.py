"""Plugin discovery through real entry points, failure handling, selection, and every hook.

Each test installs throw-away distributions as ``*.dist-info`` folders on
``PYTHONPATH`` (what pip leaves behind), and runs the real CLI in a fresh process.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from statebridge import hookspecs

GOOD_PLUGIN = '''
"""A third-party plugin that uses every hook."""
import numpy as np
import torch
import statebridge as sb
from statebridge.writers.base import Writer


class Negate(sb.Transform):
    """Negate matching tensors (registered through the statebridge_transform hook)."""
    name = "negate"

    class Params(sb.Params):
        pattern: str

    def plan(self, metas):
        from statebridge.transforms.matching import select
        return [sb.Group.map_one(k, k, metas[k], torch.neg, "negate") for k in select(self.params.pattern, metas)]


@sb.register_transform("halve")
class Halve(Negate):
    """Registered by the decorator alone."""

    def plan(self, metas):
        from statebridge.transforms.matching import select
        return [sb.Group.map_one(k, k, metas[k], lambda x: x / 2, "halve") for k in select(self.params.pattern, metas)]


class NpzWriter(Writer):
    """Collects tensors into a numpy .npz archive."""
    format = "npz"

    @classmethod
    def for_target(cls, target):
        return target.suffix == ".npz"

    def begin(self, metas):
        self.arrays = {}

    def write(self, key, tensor):
        self.arrays[key] = tensor.float().numpy()

    def finish(self):
        with open(self.path, "wb") as f:
            np.savez(f, **self.arrays)
        return [self.path]


@sb.hookimpl
def statebridge_transform():
    return [Negate]


@sb.hookimpl
def statebridge_export():
    return [NpzWriter]


@sb.hookimpl
def statebridge_validate(plan):
    if "forbidden" in plan.outputs:
        return [sb.Finding("error", "no tensor may be called forbidden", "good.names", "forbidden")]
    return [sb.Finding("info", f"{len(plan.outputs)} outputs", "good.count")]


@sb.hookimpl
def statebridge_analyses():
    return ["count"]


@sb.hookimpl
def statebridge_analyze(analysis, sources, model, options):
    if analysis != "count":
        return None
    return sb.Report("count", ["source", "tensors"], [[s.name, len(s.metas())] for s in sources])


@sb.hookimpl
def statebridge_gate(key, candidate, inputs, group, options):
    limit = options.get("max_abs")
    if limit is None or not candidate.is_floating_point():
        return None
    peak = float(candidate.abs().max())
    return sb.GateDecision(peak <= limit, f"max |x| {peak:g} vs {limit}", {"max_abs": peak}, "good.max_abs")
'''


def make_dist(root: Path, dist: str, version: str, module: str, source: str, entry: str | None = None) -> None:
    """Lay out an installed distribution: its module and a dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[statebridge]\n{entry or module} = {module}\n")


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    make_dist(root, "good-plugin", "1.2.0", "good_plugin", GOOD_PLUGIN, entry="good")
    make_dist(root, "broken-plugin", "0.3.0", "broken_plugin", "import not_a_module_anywhere\n", entry="broken")
    return root


def cli(site: Path, *args: str, **env: str):
    """Run the CLI with the test's distributions; other installed plugins are left out unless named."""
    environment = {**os.environ, "PYTHONPATH": str(site), "STATEBRIDGE_LOAD_PLUGINS": "good,broken,copycat", **env}
    for name in ("STATEBRIDGE_DISABLE_PLUGINS", "STATEBRIDGE_STRICT_PLUGINS"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run([sys.executable, "-m", "statebridge", *args], capture_output=True, text=True, env=environment, cwd=site.parent)


def names(result) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads(result.stdout)}


def test_broken_plugin_warns_with_distribution_and_version_and_others_load(site):
    result = cli(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        "statebridge: warning: statebridge plugin 'broken' from broken-plugin 0.3.0 failed to load: "
        "ModuleNotFoundError: No module named 'not_a_module_anywhere'; the other plugins are loaded"
    )
    plugins = names(result)
    assert plugins["broken"]["error"].startswith("ModuleNotFoundError")
    good = plugins["good"]
    assert (good["distribution"], good["version"]) == ("good-plugin", "1.2.0")
    assert good["transforms"] == ["halve", "negate"] and good["writers"] == ["npz"] and good["analyses"] == ["count"]
    assert set(good["hooks"]) == {f"statebridge_{h}" for h in ("transform", "export", "validate", "analyses", "analyze", "gate")}


def test_strict_mode_makes_a_broken_plugin_fatal(site):
    result = cli(site, "plugins", STATEBRIDGE_STRICT_PLUGINS="1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "statebridge: error: statebridge plugin 'broken' from broken-plugin 0.3.0 failed to load" in result.stderr


def test_load_and_disable_select_plugins(site):
    assert set(names(cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS="good"))) == {"statebridge", "good"}
    assert set(names(cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS="broken-plugin,good-plugin"))) == {"statebridge", "good", "broken"}
    result = cli(site, "plugins", "--json", STATEBRIDGE_DISABLE_PLUGINS="broken,good")
    assert set(names(result)) == {"statebridge"} and result.stderr == ""
    assert set(names(cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS=""))) == {"statebridge"}


@pytest.fixture
def checkpoint(site):
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.ones(3), "b": torch.full((2,), 4.0)}, site.parent / "ck.safetensors")
    return site.parent / "ck.safetensors"


def run_config(site: Path, text: str, *args: str):
    (site.parent / "c.yaml").write_text(text)
    return cli(site, "run", "c.yaml", "--no-progress", *args, STATEBRIDGE_DISABLE_PLUGINS="broken")


def test_transform_and_export_hooks(site, checkpoint):
    result = run_config(site, "source: ck.safetensors\ntarget: out.npz\nsteps:\n  - negate: {pattern: a}\n  - halve: {pattern: b}\n")
    assert result.returncode == 0, result.stderr
    import numpy as np

    arrays = np.load(site.parent / "out.npz")
    assert arrays["a"].tolist() == [-1, -1, -1] and arrays["b"].tolist() == [2, 2]


def test_validate_hook_stops_the_run_before_writing(site, checkpoint):
    result = run_config(site, "source: ck.safetensors\ntarget: out.safetensors\nsteps:\n  - rename: {mapping: {a: forbidden}}\n")
    assert result.returncode == 2
    assert "error (good.names) [forbidden]: no tensor may be called forbidden" in result.stderr
    assert not (site.parent / "out.safetensors").exists()
    ok = run_config(site, "source: ck.safetensors\ntarget: out.safetensors\n", "--dry-run")
    assert "info (good.count): 2 outputs" in ok.stdout


def test_gate_hook_rejects_with_its_reason(site, checkpoint):
    result = run_config(site, "source: ck.safetensors\ntarget: out.safetensors\ngates: {max_abs: 3}\nsteps:\n  - halve: {pattern: '*'}\n")
    assert result.returncode == 0, result.stderr
    result = run_config(site, "source: ck.safetensors\ntarget: out.safetensors\ngates: {max_abs: 1}\nsteps:\n  - halve: {pattern: '*'}\n")
    assert result.returncode == 2
    assert "'b': every candidate was rejected: output: good.max_abs rejected (max |x| 2 vs 1)" in result.stderr


def test_analyze_hook(site, checkpoint):
    result = cli(site, "analyze", "count", "ck.safetensors", "ck.safetensors", "--json", STATEBRIDGE_DISABLE_PLUGINS="broken")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == [["ck.safetensors", 2], ["ck.safetensors", 2]]
    missing = cli(site, "analyze", "diff", "ck.safetensors", STATEBRIDGE_DISABLE_PLUGINS="broken")
    assert missing.returncode == 2 and "no installed plugin provides the analysis 'diff'; available: count, summary" in missing.stderr


def test_two_plugins_registering_one_name_is_an_error_naming_both(site):
    make_dist(site, "copycat", "0.1", "copycat", GOOD_PLUGIN.split("class NpzWriter")[0].replace('"halve"', '"rename"'))
    result = cli(site, "plugins", STATEBRIDGE_DISABLE_PLUGINS="broken,good")
    assert result.returncode == 2
    assert "transform 'rename' is registered twice: by 'statebridge 0.1.0'" in result.stderr and "by 'copycat 0.1'" in result.stderr


def test_every_hook_is_documented():
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("statebridge_")]
    assert sorted(specs) == sorted(f"statebridge_{h}" for h in ("transform", "validate", "analyze", "analyses", "export", "gate"))
    manual = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    for name in specs:
        assert len(inspect.getdoc(getattr(hookspecs, name))) > 80, name
        assert f"`{name}`" in manual, f"{name} is missing from docs/plugins.md"
