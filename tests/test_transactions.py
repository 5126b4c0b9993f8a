"""All-or-nothing writes: failures, signals and kills never leave a half-written target."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import statebridge as sb
from statebridge.testing import LlamaShape, write_llama
from statebridge.execute.transaction import recover, staging_path
from statebridge.writers import safetensors as sb_safetensors


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(str(f.relative_to(path) if path.is_dir() else "").encode() + f.read_bytes() for f in files)).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".statebridge-" in p.name)


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


def test_transaction_on_a_file_and_a_run_inside_it(tmp_path, llama_file):
    target = tmp_path / "model.safetensors"
    with sb.transaction(target, folder=False) as tx:
        sb.run(llama_file, [sb.Cast(dtype="fp16")], tx.path.with_suffix(".safetensors"))
        os.replace(tx.path.with_suffix(".safetensors"), tx.path)
    assert sb.open_source(target).metas()["lm_head.weight"].dtype == torch.float16
    assert leftovers(tmp_path) == []


def test_in_place_conversion_replaces_the_source_atomically(tmp_path, llama_file):
    folder = tmp_path / "ckpt"
    sb.run(llama_file, None, folder, shard_size=60_000)
    sb.run(folder, [sb.Cast(dtype="bf16")], folder, shard_size=60_000)
    assert {m.dtype.name for m in sb.open_source(folder).metas().values()} == {"bfloat16"}
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


def test_recover_removes_dead_staging_and_restores_a_lost_target(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / staging_path(target).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    stale.mkdir()
    mine = staging_path(target)
    mine.mkdir()
    assert recover(target) == [stale] and mine.exists()
    old = tmp_path / staging_path(target, "old").name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    recover(target)
    assert (target / "model.safetensors").read_text() == "previous"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """About 100 MB of fp16 tensors: long enough to interrupt a conversion midway."""
    return write_llama(tmp_path_factory.mktemp("big") / "src", LlamaShape(layers=12, hidden=512, intermediate=2048, vocab=8192), shard_size=40_000_000)


def start(source: Path, target: Path) -> subprocess.Popen:
    config = target.parent / "c.yaml"
    config.write_text(f"source: {source}\ntarget: {target.name}\nshard_size: 50MB\nsteps:\n  - cast: {{dtype: fp32}}\n")
    return subprocess.Popen([sys.executable, "-m", "statebridge", "run", str(config), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def staging_window(big: Path, folder: Path) -> tuple[float, float]:
    """Seconds from start until a staging sibling appears, and until it is committed."""
    began = time.perf_counter()
    process = start(big, folder / "timing")
    appeared = gone = None
    while process.poll() is None:
        staged = bool(leftovers(folder))
        now = time.perf_counter() - began
        if appeared is None and staged:
            appeared = now
        if appeared is not None and not staged and gone is None:
            gone = now
        time.sleep(0.002)
    assert process.returncode == 0, process.stderr.read()
    assert appeared is not None, "never saw the staging folder"
    return appeared, gone or time.perf_counter() - began


def test_sigterm_cleans_up_and_leaves_the_target_as_it_was(tmp_path, big):
    target = tmp_path / "out"
    process = start(big, target)
    while not leftovers(tmp_path) and process.poll() is None:  # wait until it is writing
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    code = process.wait()
    if code == 0:
        pytest.skip("the run finished before the signal arrived")
    assert code == 130 and "the target was left as it was" in process.stderr.read()
    assert not target.exists() and leftovers(tmp_path) == []


def complete(target: Path) -> bool:
    return {m.dtype.name for m in sb.open_source(target).metas().values()} == {"float32"}


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_at_several_points_leaves_the_target_absent_or_intact(tmp_path, big, existing):
    appear, end = staging_window(big, tmp_path)
    target = tmp_path / "out"
    if existing:
        sb.run(big, None, target, shard_size=30_000_000)
    before = digest(target) if existing else None
    source_before = digest(big)
    interrupted = 0
    for fraction in (0.05, 0.25, 0.5, 0.75):
        process = start(big, target)
        time.sleep(appear + (end - appear) * fraction)
        process.kill()
        process.wait()
        untouched = digest(target) == before if existing else not target.exists()
        if not untouched:
            # the only other acceptable state: the run had already committed a complete target
            assert complete(target), f"a half-written target after SIGKILL at {fraction:.0%} of the write"
            break
        interrupted += 1
    assert interrupted >= 1, "the runs finished too fast to be interrupted"
    assert digest(big) == source_before
    process = start(big, target)
    assert process.wait() == 0, process.stderr.read()
    assert leftovers(tmp_path) == [] and complete(target)
