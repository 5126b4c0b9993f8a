"""Full, size-limited and read-only targets, killed probes and corrupt caches: one line, nothing left behind.

A write that fails (``ulimit -f``, a small tmpfs, a read-only mount, an immutable folder)
gives one ``statebridge: error:`` line naming the target, removes the staging sibling and
leaves the previous target as it was.  The mount variants need root (they are skipped with
the reason where mounting is not permitted).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import statebridge as sb

sys.path.insert(0, str(Path(__file__).parent))
import paused  # noqa: E402

estimate_module = importlib.import_module("statebridge.execute.estimate")

FORMATS = {"torch": "out.pt", "safetensors": "out.safetensors", "shards": "out", "gguf": "out.gguf"}


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def run_cli(config: Path, cache: Path, *args: str, preexec=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *paused.cli("run", str(config), "--no-progress", *args)],
        env=paused.environment(cache), capture_output=True, text=True, preexec_fn=preexec,
    )


def one_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The run failed with exit status 2 and exactly one error line holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("statebridge: error:")]
    assert result.returncode == 1, (result.returncode, result.stderr)  # a failed run, not bad input
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, result.stderr
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), (lines, fragments)
    return lines[0]


def prepare(folder: Path, llama_file: Path, name: str) -> tuple[Path, Path, str]:
    """A previous float16 target that statebridge wrote (or, for torch, any .pt), and a config that writes float32 over it."""
    target = folder / name
    sb.run(llama_file, [sb.Cast(dtype="fp16")], target, shard_size=300_000 if name == "out" else None)
    config = folder / "c.yaml"
    overwrite = "overwrite: true\n" if name.endswith(".pt") else ""  # torch files carry no provenance
    config.write_text(f"source: {llama_file}\ntarget: {name}\nshard_size: 300KB\n{overwrite}steps: []\n")
    return target, config, digest(target)


def _limit_file_size(limit: int):
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_size_limit_is_one_line_and_leaves_the_target(tmp_path, llama_file, fmt):
    """A ``.pt`` target aborted in C++ here and left a hidden file of the size reached."""
    work = tmp_path / "work"
    work.mkdir()
    target, config, before = prepare(work, llama_file, FORMATS[fmt])
    result = run_cli(config, tmp_path / "fresh-cache", preexec=_limit_file_size(250_000))
    one_error(result, str(target), "File too large")
    assert digest(target) == before and paused.hidden(work) == []


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting is not permitted here (mount {' '.join(args)}: {done.stderr.strip()})")


@pytest.fixture
def mounted(tmp_path):
    """Mount points made by the test, unmounted afterwards whatever happens."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "shards"])
def test_a_full_disk_is_one_line_and_leaves_the_target(tmp_path, llama_file, mounted, fmt):
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk))
    mounted.append(disk)
    target, config, before = prepare(disk, llama_file, FORMATS[fmt])
    result = run_cli(config, tmp_path / "fresh-cache")
    one_error(result, str(target), "No space left on device")
    assert digest(target) == before and paused.hidden(disk) == []


@pytest.mark.parametrize("fmt", ["torch", "shards"])
def test_a_read_only_mount_is_one_line_and_leaves_the_target(tmp_path, llama_file, mounted, fmt):
    folder = tmp_path / "ro"
    folder.mkdir()
    target, config, before = prepare(folder, llama_file, FORMATS[fmt])
    _mount("--bind", str(folder), str(folder))
    mounted.append(folder)
    _mount("-o", "remount,bind,ro", str(folder))
    result = run_cli(config, tmp_path / "fresh-cache")
    line = one_error(result, str(target), "Read-only file system")
    assert "~statebridge-" not in line  # named by the target, not the hidden staging sibling
    assert digest(target) == before and paused.hidden(folder) == []


def test_an_immutable_folder_is_one_line_and_leaves_the_target(tmp_path, llama_file):
    """As root, chmod does not stop writes; ``chattr +i`` does (where the file system supports it)."""
    folder = tmp_path / "frozen"
    folder.mkdir()
    target, config, before = prepare(folder, llama_file, "out")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
    try:
        result = run_cli(config, tmp_path / "fresh-cache")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    one_error(result, str(target), "Operation not permitted")
    assert digest(target) == before and paused.hidden(folder) == []


# -- leftovers of killed probes, corrupt caches ---------------------------------------------------


@pytest.mark.parametrize("then", ["dry run", "run into another target"])
def test_a_probe_killed_midway_leaves_a_recognisable_file_that_the_next_run_removes(tmp_path, llama_file, then):
    """SIGKILL during the bandwidth probe left 64 MB hidden files that no later run removed."""
    work = tmp_path / "work"
    work.mkdir()
    config = work / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: out\nsteps: []\n")
    run = paused.start(paused.cli("run", str(config), "--dry-run"), "probe", cache=tmp_path / "cache-1")
    run.kill()
    [left] = paused.hidden(work)
    assert "~statebridge-probe-" in left and (work / left).stat().st_size == estimate_module.PROBE_BYTES
    if then == "dry run":
        result = run_cli(config, tmp_path / "cache-2", "--dry-run")
        assert result.returncode == 0, result.stderr
    else:
        sb.run(llama_file, None, work / "elsewhere.safetensors")
    assert paused.hidden(work) == []


def _device_key(folder: Path) -> str:
    return str(os.stat(folder).st_dev)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage",
        b"[]",
        b"{",
        b"null",
        b'{"DEV": "fast"}',
        b'{"DEV": {"read": "1e9", "write": 1e9, "when": 1}}',
        b'{"DEV": {"read": NaN, "write": 1e9, "when": NOW}}',
        b'{"DEV": {"read": -5, "write": 1e9, "when": NOW}}',
        b'{"DEV": {"read": 1e9, "write": 1e9}}',
        b'{"DEV": {"read": true, "write": 1e9, "when": NOW}}',
        b'{"DEV": {"read": 1e9, "write": 1e9, "when": 1e300}}',
        b"[" * 100_000,
        "directory",
    ],
)
def test_a_corrupt_bandwidth_cache_is_measured_over_without_a_traceback(tmp_path, statebridge_cache, content):
    folder = tmp_path / "target-folder"
    folder.mkdir()
    cache = statebridge_cache / "bandwidth.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.unlink(missing_ok=True)  # the seeded measurement (conftest) is replaced by the corrupt one
    if content == "directory":
        cache.mkdir()
    else:
        cache.write_bytes(content.replace(b"DEV", _device_key(folder).encode()).replace(b"NOW", str(time.time()).encode()))
    measured = estimate_module.probe(folder)
    assert measured.measured and measured.read > 0 and measured.write > 0
    assert measured.read != 1e9  # not the corrupt entry
    if content != "directory":
        entry = json.loads(cache.read_text())[_device_key(folder)]
        assert entry["read"] == measured.read and entry["write"] == measured.write
    assert paused.hidden(folder) == [] and paused.hidden(statebridge_cache) == []


def test_a_corrupt_cache_through_the_command_line(tmp_path, llama_file):
    cache = tmp_path / "cli-cache"
    cache.mkdir()
    (cache / "bandwidth.json").write_text('{"1": ')
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: out\nsteps: []\n")
    result = run_cli(config, cache, "--dry-run")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "measured" in result.stdout
