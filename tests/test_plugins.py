"""Plugin discovery through real entry points, failure handling, selection, and every hook.

Each test installs throw-away distributions as ``*.dist-info`` folders on
``PYTHONPATH`` (what pip leaves behind), and runs the real CLI in a fresh process.
"""

from __future__ import annotations

import inspect
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from statebridge import hookspecs

GOOD_PLUGIN = '''
"""A third-party plugin that uses every hook."""
import click
import numpy as np
import torch
import statebridge as sb


class Negate(sb.Transform):
    """Negate matching tensors."""
    name = "negate"

    class Params(sb.Params):
        pattern: str

    def plan(self, metas):
        return [sb.Group.map_one(k, k, metas[k], torch.neg, "negate") for k in sb.select(self.params.pattern, metas)]


class Halve(Negate):
    """Halve matching tensors, under a namespaced name."""
    name = "good.halve"

    def plan(self, metas):
        return [sb.Group.map_one(k, k, metas[k], lambda x: x / 2, "halve") for k in sb.select(self.params.pattern, metas)]


class NpzWriter(sb.Writer):
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
def register_transforms(register):
    register(Negate)
    register(Halve)


@sb.hookimpl
def register_writers(register):
    register(NpzWriter)


@sb.hookimpl
def validate_plan(plan):
    if "forbidden" in plan.outputs:
        return [sb.Finding("error", "no tensor may be called forbidden", "good.names", "forbidden")]
    return [sb.Finding("info", f"{len(plan.outputs)} outputs", "good.count")]


@sb.hookimpl
def register_analyses(register):
    register("count", lambda sources, model, options: sb.Report("count", ["source", "tensors"], [[s.name, len(s.metas())] for s in sources]))


def max_abs(key, candidate, inputs, group, limit):
    if not candidate.is_floating_point():
        return None
    peak = float(candidate.abs().max())
    return sb.GateDecision(peak <= limit, f"max |x| {peak:g} vs {limit}", {"max_abs": peak})


@sb.hookimpl
def register_gates(register):
    register("max_abs", max_abs)


@click.group()
def good():
    """The good plugin's commands."""


@good.command()
@click.argument("path")
def count(path):
    """Count the tensors of PATH."""
    click.echo(len(sb.open_source(path).metas()))


@good.command()
@click.argument("path")
@click.pass_context
def check(ctx, path):
    """Exit 1 when PATH holds more than one tensor (a check for CI)."""
    if len(sb.open_source(path).metas()) > 1:
        click.echo("too many tensors")
        ctx.exit(1)


@sb.hookimpl
def register_commands(register):
    register(good)
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
        "statebridge: warning: statebridge plugin 'broken' from broken-plugin 0.3.0 failed: "
        "ModuleNotFoundError: No module named 'not_a_module_anywhere'; the other plugins still work"
    )
    plugins = names(result)
    assert plugins["broken"]["error"].startswith("ModuleNotFoundError")
    good = plugins["good"]
    assert (good["distribution"], good["version"]) == ("good-plugin", "1.2.0")
    assert good["provides"] == {
        "transforms": ["good.halve", "negate"], "writers": ["npz"], "gates": ["max_abs"], "analyses": ["count"], "commands": ["good"],
    }
    assert good["hooks"] == sorted(f"register_{k}" for k in ("transforms", "writers", "gates", "analyses", "commands")) + ["validate_plan"]


def test_a_broken_plugin_does_not_stop_help_or_other_commands(site, checkpoint):
    helped = cli(site, "--help")
    assert helped.returncode == 0 and "broken" in helped.stdout and "ModuleNotFoundError" in helped.stdout
    assert re.search(r"\n  good +The good plugin's commands.  \[good\]\n", helped.stdout), helped.stdout
    counted = cli(site, "good", "count", "ck.safetensors")
    assert counted.returncode == 0 and counted.stdout == "2\n", counted.stderr


def test_a_plugin_command_sets_the_exit_status(site, checkpoint):
    """``ctx.exit(1)`` in a plugin's command is the process's exit status (a lint for CI depends on it)."""
    checked = cli(site, "good", "check", "ck.safetensors")
    assert checked.returncode == 1 and checked.stdout == "too many tensors\n", checked.stderr


def test_strict_mode_makes_a_broken_plugin_fatal(site):
    result = cli(site, "plugins", STATEBRIDGE_STRICT_PLUGINS="1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "statebridge: error: statebridge plugin 'broken' from broken-plugin 0.3.0 failed: ModuleNotFoundError" in result.stderr


def test_load_and_disable_select_plugins(site):
    assert set(names(cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS="good"))) == {"statebridge", "good"}
    assert set(names(cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS="broken-plugin,good-plugin"))) == {"statebridge", "good", "broken"}
    result = cli(site, "plugins", "--json", STATEBRIDGE_DISABLE_PLUGINS="broken,good")
    assert set(names(result)) == {"statebridge"} and result.stderr == ""
    assert set(names(cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS=""))) == {"statebridge"}


def test_disabling_a_plugin_removes_its_command_and_namespaced_transform(site, checkpoint):
    (site.parent / "c.yaml").write_text("source: ck.safetensors\ntarget: out.safetensors\nsteps:\n  - good.halve: {pattern: b}\n")
    enabled = cli(site, "plan", "c.yaml", STATEBRIDGE_DISABLE_PLUGINS="broken")
    assert enabled.returncode == 0 and "halve" in enabled.stdout, enabled.stderr
    disabled = cli(site, "plan", "c.yaml", STATEBRIDGE_DISABLE_PLUGINS="broken,good")
    assert disabled.returncode == 2 and "unknown transform 'good.halve'" in disabled.stderr
    gone = cli(site, "good", "count", "ck.safetensors", STATEBRIDGE_DISABLE_PLUGINS="broken,good")
    assert gone.returncode == 2 and "No such command 'good'" in gone.stderr
    assert "good" not in cli(site, "--help", STATEBRIDGE_DISABLE_PLUGINS="broken,good").stdout


def test_disabling_in_process_removes_everything_it_registered(site, monkeypatch):
    from statebridge.plugins import load_plugins

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("STATEBRIDGE_LOAD_PLUGINS", "good")
    loaded = load_plugins()
    assert "good.halve" in loaded.transforms and "good" in loaded.commands and "max_abs" in loaded.gates
    monkeypatch.setenv("STATEBRIDGE_DISABLE_PLUGINS", "good")
    reloaded = load_plugins()
    assert "good.halve" not in reloaded.transforms and "good" not in reloaded.commands and "max_abs" not in reloaded.gates
    assert "negate" not in reloaded.transforms and "npz" not in reloaded.writers and "count" not in reloaded.analyses


@pytest.fixture
def checkpoint(site):
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.ones(3), "b": torch.full((2,), 4.0)}, site.parent / "ck.safetensors")
    return site.parent / "ck.safetensors"


def run_config(site: Path, text: str, *args: str):
    (site.parent / "c.yaml").write_text(text)
    return cli(site, "run", "c.yaml", "--no-progress", *args, STATEBRIDGE_DISABLE_PLUGINS="broken")


def test_transform_and_writer_hooks(site, checkpoint):
    result = run_config(site, "source: ck.safetensors\ntarget: out.npz\nsteps:\n  - negate: {pattern: a}\n  - good.halve: {pattern: b}\n")
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


def test_gate_rejects_with_its_reason_and_an_unknown_gate_is_refused(site, checkpoint):
    result = run_config(site, "source: ck.safetensors\ntarget: out.safetensors\ngates: {max_abs: 3}\nsteps:\n  - good.halve: {pattern: '*'}\n")
    assert result.returncode == 0, result.stderr
    result = run_config(site, "source: ck.safetensors\ntarget: out.safetensors\ngates: {max_abs: 1}\nsteps:\n  - good.halve: {pattern: '*'}\n")
    assert result.returncode == 1, result.stderr
    assert "'b': every candidate was rejected: output: max_abs rejected (max |x| 2 vs 1)" in result.stderr
    assert not (site.parent / "out.safetensors").exists() or result.returncode == 1
    typo = run_config(site, "source: ck.safetensors\ntarget: typo.safetensors\ngates: {max_ab: 1}\n")
    assert typo.returncode == 2 and "gates: unknown gate 'max_ab'; did you mean 'max_abs'?" in typo.stderr
    assert not (site.parent / "typo.safetensors").exists()


def test_analyze_hook(site, checkpoint):
    result = cli(site, "analyze", "count", "ck.safetensors", "ck.safetensors", "--json", STATEBRIDGE_DISABLE_PLUGINS="broken")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == [["ck.safetensors", 2], ["ck.safetensors", 2]]
    missing = cli(site, "analyze", "diff", "ck.safetensors", STATEBRIDGE_DISABLE_PLUGINS="broken")
    assert missing.returncode == 2 and "unknown analysis 'diff'" in missing.stderr and "count, summary" in missing.stderr


def test_two_plugins_registering_one_name_is_reported_naming_both(site):
    make_dist(site, "copycat", "0.1", "copycat", GOOD_PLUGIN.replace('"good.halve"', '"rename"').replace("def register_writers", "def _unused"))
    result = cli(site, "plugins", STATEBRIDGE_DISABLE_PLUGINS="broken,good")
    assert "transform 'rename' is registered twice: by statebridge 0.1.0" in result.stderr and "by copycat 0.1" in result.stderr
    strict = cli(site, "plugins", STATEBRIDGE_DISABLE_PLUGINS="broken,good", STATEBRIDGE_STRICT_PLUGINS="1")
    assert strict.returncode == 2 and "registered twice" in strict.stderr


def test_a_plugin_name_that_breaks_the_rules_is_refused(site):
    make_dist(site, "badname", "0.1", "badname", GOOD_PLUGIN.replace('"good.halve"', '"good halve"'))
    result = cli(site, "plugins", "--json", STATEBRIDGE_LOAD_PLUGINS="badname")
    assert "registered the transform name 'good halve'" in result.stderr
    assert names(result)["badname"]["provides"]["transforms"] == ["negate"]


def test_every_hook_is_documented():
    specs = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)]
    assert sorted(specs) == sorted([*(f"register_{k}" for k in ("transforms", "writers", "gates", "analyses", "commands")), "validate_plan", "suggest_keys"])
    manual = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    assert "hookspecs.py" in manual
    for name in specs:
        assert len(inspect.getdoc(getattr(hookspecs, name))) > 40, name


COUNTING_PLUGIN = '''
import os
import statebridge as sb


@sb.hookimpl
def validate_plan(plan):
    with open(os.environ["COUNT_FILE"], "a") as f:
        f.write("validated\\n")
    return []
'''


def test_validate_hooks_run_once_per_run_and_plan(site, checkpoint):
    make_dist(site, "counting", "0.1", "counting", COUNTING_PLUGIN)
    count = site.parent / "count.txt"
    (site.parent / "c.yaml").write_text("source: ck.safetensors\ntarget: out.safetensors\nsteps:\n  - rename: {mapping: {a: z}}\n")
    for args, expected in ((["run", "c.yaml", "--no-progress"], 1), (["run", "c.yaml", "--dry-run"], 1), (["plan", "c.yaml"], 1)):
        count.unlink(missing_ok=True)
        done = cli(site, *args, STATEBRIDGE_LOAD_PLUGINS="counting", COUNT_FILE=str(count))
        assert done.returncode == 0, done.stderr
        assert count.read_text().count("validated") == expected, args


def test_analyze_summary_covers_every_path_it_is_given(site, checkpoint):
    from safetensors.torch import save_file
    import torch

    save_file({"other": torch.zeros(2, 2)}, site.parent / "two.safetensors")
    result = cli(site, "analyze", "summary", "ck.safetensors", "two.safetensors", "--json", STATEBRIDGE_LOAD_PLUGINS="")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [c["title"] for c in report["checkpoints"]] == ["ck.safetensors", "two.safetensors"]
    assert [row[:2] for row in report["rows"]] == [["ck.safetensors", "a"], ["ck.safetensors", "b"], ["two.safetensors", "other"]]


def test_discovery_finds_what_importlib_metadata_finds(site):
    """statebridge reads entry points itself (for start-up speed); it must agree with the standard library."""
    import importlib.metadata

    from statebridge import discovery

    for path in ([], [str(site)]):
        import sys

        saved = list(sys.path)
        sys.path[:0] = path
        try:
            ours = {(e.name, e.value, re.sub(r"[-_.]+", "-", e.distribution).lower(), e.version) for e in discovery.entry_points("statebridge")}
            theirs = {
                (e.name, e.value, re.sub(r"[-_.]+", "-", e.dist.name).lower(), e.dist.version)
                for e in importlib.metadata.entry_points(group="statebridge")
            }
        finally:
            sys.path[:] = saved
        assert ours == theirs and ours
