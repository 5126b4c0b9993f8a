"""All-or-nothing writes: failures, signals and kills never leave a half-written target.

Interruptions happen at pause points the test controls (``tests/paused.py``), never by timing.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import statebridge as sb
from statebridge.errors import ConfigError, ExecutionError
from statebridge.execute.transaction import HOST, staging_path, sweep
from statebridge.writers import safetensors as sb_safetensors

sys.path.insert(0, str(Path(__file__).parent))
import paused  # noqa: E402

tx_module = importlib.import_module("statebridge.execute.transaction")


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(str(f.relative_to(path) if path.is_dir() else "").encode() + f.read_bytes() for f in files)).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return paused.hidden(folder)


def dtypes(target: Path) -> set[str]:
    with sb.open_source(target) as source:
        return {m.dtype.name for m in source.metas().values()}


def test_transaction_is_copy_on_write(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("original")
    with sb.transaction(target) as tx:
        assert (tx.path / "a.txt").read_text() == "original"
        (tx.path / "a.txt").write_text("edited")
        (tx.path / "b.txt").write_text("new")
        assert (target / "a.txt").read_text() == "original"
    assert (target / "a.txt").read_text() == "edited" and (target / "b.txt").read_text() == "new"
    with pytest.raises(RuntimeError):
        with sb.transaction(target) as tx:
            (tx.path / "a.txt").write_text("half")
            raise RuntimeError("changed my mind")
    assert (target / "a.txt").read_text() == "edited"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name", ["model.safetensors", "ckpt", "out.pt", "model.v2.safetensors", ".hidden", "a.", "x~y.gguf", "50%.bin", "llama-3.1-8b"]
)
def test_staging_names_keep_the_suffix_and_name_their_target(tmp_path, name):
    """A writer picks the format from ``tx.path`` as from the target; the sweep reads the target back."""
    target = tmp_path / name
    staging = staging_path(target)
    assert staging.suffix == target.suffix and staging.parent == target.parent
    assert staging.name.startswith(".") and "~statebridge-tmp-" in staging.name
    match = tx_module._LEFTOVER.match(staging.name)
    assert match is not None and tx_module._target_name(match) == name


def _trust_md_example() -> str:
    text = (Path(__file__).parents[1] / "docs" / "trust.md").read_text()
    section = text[text.index("## Transactions") :]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return next(block for block in blocks if "tx.path" in block and "sb.run(" in block)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("folder", [False, True])
def test_the_trust_md_example_runs_as_written(tmp_path, monkeypatch, llama_file, existing, folder):
    """docs/trust.md: a run into ``tx.path``, checked before the commit (it failed: the staging name hid the format)."""
    code = _trust_md_example()
    assert 'sb.transaction("out/")' in code and 'sb.run("ckpt/", steps, tx.path)' in code
    if not folder:
        code = code.replace('"out/"', '"out.safetensors"')
    monkeypatch.chdir(tmp_path)
    sb.run(llama_file, None, "ckpt", shard_size=60_000)
    target = tmp_path / ("out" if folder else "out.safetensors")
    if existing:
        sb.run(llama_file, None, target, shard_size=60_000)
    exec(compile(code, "docs/trust.md", "exec"), {})
    assert dtypes(target) == {"bfloat16"} and target.is_dir() == folder
    assert leftovers(tmp_path) == []


def test_a_failed_check_in_the_trust_md_example_keeps_the_target(tmp_path, monkeypatch, llama_file):
    monkeypatch.chdir(tmp_path)
    sb.run(llama_file, None, "ckpt", shard_size=60_000)
    sb.run(llama_file, None, "out", shard_size=60_000)
    before = digest(tmp_path / "out")
    code = _trust_md_example()
    assert '"lm_head.weight"' in code
    with pytest.raises(AssertionError):
        exec(compile(code.replace('"lm_head.weight"', '"no.such.weight"'), "docs/trust.md", "exec"), {})
    assert digest(tmp_path / "out") == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["rmtree", "rename", "replace_by_file"])
def test_a_body_that_removes_the_staging_folder_leaves_the_target(tmp_path, how):
    """The target was deleted: ``rmtree(target)`` ran before the ``os.replace`` that then failed."""
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("keep me")
    with pytest.raises(ExecutionError, match=r"cannot commit .*ckpt: its staged version .* is gone"):
        with sb.transaction(target) as tx:
            if how == "rmtree":
                shutil.rmtree(tx.path)
            elif how == "rename":
                tx.path.rename(tmp_path / "elsewhere")
            else:
                shutil.rmtree(tx.path)
                (tmp_path / "elsewhere").mkdir()
    assert (target / "a.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_a_body_that_removes_the_staging_file_leaves_the_target(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(ExecutionError, match="is gone"):
        with sb.transaction(target) as tx:
            tx.path.unlink()
    assert target.read_bytes() == b"previous"


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("old_kind, new_kind", [("folder", "folder"), ("folder", "file"), ("file", "folder"), ("file", "file")])
def test_the_swap_removes_the_previous_target_only_once_the_new_one_is_in_place(tmp_path, monkeypatch, exchange, old_kind, new_kind):
    """Every removal during a commit happens with the complete new version already at the target."""
    target = tmp_path / "t"
    if old_kind == "folder":
        target.mkdir()
        (target / "old.txt").write_text("old")
    else:
        target.write_text("old")
    if not exchange:
        monkeypatch.setattr(tx_module, "_exchange", lambda a, b: False)
    real_remove = tx_module._remove
    removals: list[str] = []

    def remove(path: Path) -> None:
        if path.exists():
            new = (target / "new.txt").read_text() if target.is_dir() else target.read_text()
            assert new == "new", f"removed {path.name} while the target held {new!r}"
            removals.append(path.name)
        real_remove(path)

    monkeypatch.setattr(tx_module, "_remove", remove)
    with sb.transaction(target, folder=new_kind == "folder", copy=False) as tx:
        if new_kind == "folder":
            (tx.path / "new.txt").write_text("new")
        else:
            tx.path.write_text("new")
    assert ((target / "new.txt") if new_kind == "folder" else target).read_text() == "new"
    assert target.is_dir() == (new_kind == "folder") and leftovers(tmp_path) == []
    if (old_kind, new_kind) != ("file", "file"):
        assert removals, "the previous target was never removed"


def test_a_failed_second_rename_of_the_fallback_swap_puts_the_old_target_back(tmp_path, monkeypatch):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(tx_module, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(".t~statebridge-tmp-"):
            raise OSError(5, "Input/output error")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ExecutionError, match=r"cannot write .*t: Input/output error"):
        with sb.transaction(target, copy=False) as tx:
            (tx.path / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and leftovers(tmp_path) == []


def test_transaction_on_a_file_and_a_run_inside_it(tmp_path, llama_file):
    target = tmp_path / "model.safetensors"
    with sb.transaction(target, folder=False) as tx:
        sb.run(llama_file, [sb.Cast(dtype="fp16")], tx.path)
    assert dtypes(target) == {"float16"}
    assert leftovers(tmp_path) == []


def test_in_place_conversion_needs_overwrite_and_replaces_the_source_atomically(tmp_path, llama_file):
    folder = tmp_path / "ckpt"
    sb.run(llama_file, None, folder, shard_size=60_000)
    before = digest(folder)
    with pytest.raises(ConfigError, match=r"target .*ckpt is the source; .* --overwrite"):
        sb.run(folder, [sb.Cast(dtype="bf16")], folder, shard_size=60_000)
    assert digest(folder) == before
    report = sb.run(folder, [sb.Cast(dtype="bf16")], folder, shard_size=60_000, overwrite=True)
    assert dtypes(folder) == {"bfloat16"}
    assert "the source" in report.replaced and "replaced what was there: the source" in report.render()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["file", "shards"])
def test_durable_runs_fsync_and_non_durable_runs_do_not_but_write_the_same_bytes(tmp_path, llama_file, monkeypatch, layout):
    """``durable=False`` (``--no-fsync``) drops every fsync and early writeback, and nothing else."""
    sb.run(llama_file, None, tmp_path / "warm.safetensors")  # measures (and caches) the disk's bandwidth, with fsync
    calls: list[str] = []
    real_fsync, real_writeback = os.fsync, sb_safetensors.start_writeback
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(sb_safetensors, "WRITEBACK_EVERY", 1)  # kick writeback after every tensor
    monkeypatch.setattr(sb_safetensors, "start_writeback", lambda *a: (calls.append("writeback"), real_writeback(*a))[1])
    outputs = {}
    for durable in (True, False):
        calls.clear()
        target = tmp_path / f"{durable}" / ("model.safetensors" if layout == "file" else "ckpt")
        sb.run(llama_file, [sb.Cast(pattern="**.mlp.**", dtype="bf16")], target, shard_size=60_000, durable=durable)
        files = sorted(target.rglob("*")) if target.is_dir() else [target]
        outputs[durable] = {f.name: f.read_bytes() for f in files}
        assert ("fsync" in calls and "writeback" in calls) if durable else calls == [], (durable, calls)
    assert outputs[True] == outputs[False]


def test_no_fsync_on_the_command_line_and_durable_false_in_a_config(tmp_path, llama_file, monkeypatch):
    from statebridge.cli import main

    sb.run(llama_file, None, tmp_path / "warm.safetensors")  # measures (and caches) the disk's bandwidth, with fsync
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {llama_file}\nsteps: []\n")
    assert main(["run", str(config), "--no-progress", "--no-fsync", "--target", str(tmp_path / "a.safetensors")]) == 0
    config.write_text(f"source: {llama_file}\nsteps: []\ndurable: false\n")
    assert main(["run", str(config), "--no-progress", "--target", str(tmp_path / "b.safetensors")]) == 0
    assert synced == []
    config.write_text(f"source: {llama_file}\nsteps: []\n")
    assert main(["run", str(config), "--no-progress", "--target", str(tmp_path / "d.safetensors")]) == 0
    assert synced  # durable by default
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _as(path: Path, pid: int, host: str = HOST) -> Path:
    """``path`` (a staging name of this process) as if another process (or host) had made it."""
    return path.with_name(path.name.replace(f"-{HOST}-{os.getpid()}-", f"-{host}-{pid}-"))


def test_sweep_removes_only_leftovers_of_dead_processes_on_this_host_and_restores_a_lost_target(tmp_path):
    target = tmp_path / "out"
    dead = _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        stale = _as(staging_path(target), dead)
        stale.mkdir()
        probe = _as(staging_path(tmp_path / "bandwidth-probe", "probe"), dead)
        probe.write_bytes(b"x" * 1000)
        other_target = _as(staging_path(tmp_path / "model.pt"), dead)
        other_target.write_bytes(b"half")
        live = _as(staging_path(target), alive.pid)
        live.mkdir()
        remote = _as(staging_path(target), dead, host="0123abcd")
        remote.mkdir()
        mine = staging_path(target)
        mine.mkdir()
        foreign = tmp_path / ".out.statebridge-notes"  # not a name statebridge makes
        foreign.write_text("user file")
        assert sorted(sweep(tmp_path)) == sorted([stale, probe, other_target])
        assert live.exists() and remote.exists() and mine.exists() and foreign.read_text() == "user file"
        old = _as(staging_path(target, "old"), dead)
        old.mkdir()
        (old / "model.safetensors").write_text("previous")
        sweep(tmp_path)
        assert (target / "model.safetensors").read_text() == "previous" and not old.exists()
        again = _as(staging_path(target, "old"), dead)  # target present: an old copy is garbage
        again.mkdir()
        assert sweep(tmp_path) == [again] and (target / "model.safetensors").read_text() == "previous"
    finally:
        alive.communicate(b"")


def run_config(folder: Path, source: Path, target: str) -> Path:
    config = folder / "c.yaml"
    config.write_text(f"source: {source}\ntarget: {target}\nshard_size: 60KB\nsteps:\n  - cast: {{dtype: bf16}}\n")
    return config


@pytest.mark.parametrize("point", ["writing", "commit"])
def test_sigterm_cleans_up_and_leaves_the_target_as_it_was(tmp_path, llama_file, statebridge_cache, point):
    config = run_config(tmp_path, llama_file, "out")
    sb.run(llama_file, None, tmp_path / "out", shard_size=60_000)
    before = digest(tmp_path / "out")
    run = paused.start(paused.cli("run", str(config), "--no-progress"), point, cache=statebridge_cache)
    assert leftovers(tmp_path)  # it is staging
    run.process.send_signal(signal.SIGTERM)
    result = run.resume()
    assert result.returncode == 130 and "the target was left as it was" in result.stderr
    assert digest(tmp_path / "out") == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("point", ["probe", "writing", "commit"])
def test_sigkill_leaves_the_target_absent_or_intact_and_the_next_run_cleans_up(tmp_path, llama_file, statebridge_cache, existing, point):
    target = tmp_path / "out"
    config = run_config(tmp_path, llama_file, "out")
    if existing:
        sb.run(llama_file, None, target, shard_size=60_000)
    before = digest(target) if existing else None
    source_before = digest(llama_file)
    cache = tmp_path / "fresh-cache" if point == "probe" else statebridge_cache  # a cached bandwidth is not probed again
    run = paused.start(paused.cli("run", str(config), "--no-progress"), point, cache=cache)
    run.kill()
    assert (digest(target) == before) if existing else not target.exists()
    assert leftovers(tmp_path), "a killed run leaves its hidden files behind"
    assert digest(llama_file) == source_before
    result = subprocess.run(
        [sys.executable, *paused.cli("run", str(config), "--no-progress")],
        env=paused.environment(statebridge_cache), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert leftovers(tmp_path) == [] and dtypes(target) == {"bfloat16"}


def test_a_second_run_into_a_target_being_written_is_refused(tmp_path, llama_file, statebridge_cache):
    """Concurrent runs into one target: the second must not touch the first's output."""
    config = run_config(tmp_path, llama_file, "out")
    first = paused.start(paused.cli("run", str(config), "--no-progress"), "commit", cache=statebridge_cache)
    pid = first.process.pid
    with pytest.raises(ConfigError, match=rf"another statebridge run \(process {pid}\) is writing .*out; wait"):
        sb.run(llama_file, None, tmp_path / "out", shard_size=60_000)
    with pytest.raises(ConfigError, match="another statebridge run"):
        sb.run(llama_file, None, tmp_path / "out", shard_size=60_000, overwrite=True)
    assert not (tmp_path / "out").exists() and len(leftovers(tmp_path)) == 1
    result = first.resume()
    assert result.returncode == 0, result.stderr
    assert dtypes(tmp_path / "out") == {"bfloat16"} and leftovers(tmp_path) == []


def test_a_run_into_a_target_an_open_transaction_stages_is_refused(tmp_path, llama_file):
    target = tmp_path / "model.safetensors"
    with sb.transaction(target) as tx:
        with pytest.raises(ConfigError, match="an open transaction of this process"):
            sb.run(llama_file, None, target)
        sb.run(llama_file, None, tx.path)
    assert dtypes(target) == {"float32"} and leftovers(tmp_path) == []


def test_after_a_killed_run_the_next_run_into_its_target_proceeds(tmp_path, llama_file, statebridge_cache):
    config = run_config(tmp_path, llama_file, "out.safetensors")
    paused.start(paused.cli("run", str(config), "--no-progress"), "writing", cache=statebridge_cache).kill()
    assert leftovers(tmp_path)
    sb.run(llama_file, None, tmp_path / "out.safetensors")
    assert dtypes(tmp_path / "out.safetensors") == {"float32"} and leftovers(tmp_path) == []
