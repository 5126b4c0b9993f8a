"""A source file replaced or changed during a run fails it before the commit, naming the file.

The run is stopped after its first group (pause point ``writing``), the source is changed
as a user or another job would, and the run is let go on: it read part of the old version
and would read the rest from the new one.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge.errors import SourceError

sys.path.insert(0, str(Path(__file__).parent))
import paused  # noqa: E402

TENSORS = 8


def state(value: float) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((64, 64), value + i) for i in range(TENSORS)}


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def _other_version(path: Path) -> Path:
    """A file with the same tensors, names and size as ``path``, other values."""
    fresh = path.with_name("fresh.tmp")
    save_file({k: v + 100 for k, v in load_file(path).items()}, fresh)
    assert fresh.stat().st_size == path.stat().st_size and fresh.read_bytes() != path.read_bytes()
    return fresh


def _replace(path: Path) -> None:
    """Another file of the same size takes the name (as a download or a ``mv`` would do)."""
    os.replace(_other_version(path), path)


def _rewrite(path: Path) -> None:
    """The same file is rewritten in place, same size, other bytes."""
    fresh = _other_version(path)
    data = fresh.read_bytes()
    fresh.unlink()
    with open(path, "r+b") as f:
        f.write(data)


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "change, message",
    [
        (_replace, "was replaced by another file during the run"),
        (_rewrite, "was modified during the run"),
        (_remove, "was removed during the run"),
    ],
)
@pytest.mark.parametrize("layout", ["file", "shards"])
@pytest.mark.parametrize("steps", ["[]", "[{cast: {dtype: fp16}}]"])
def test_a_source_changed_during_the_run_fails_it_and_leaves_the_target(tmp_path, change, message, layout, steps):
    if layout == "file":
        source = tmp_path / "src.safetensors"
        save_file(state(0.0), source)
        changed = source
    else:
        source = tmp_path / "src"
        source.mkdir()
        for part in range(2):
            save_file({k: v for k, v in state(0.0).items() if int(k[1:]) % 2 == part}, source / f"part{part}.safetensors")
        changed = source / "part1.safetensors"
    target = tmp_path / "out"
    sb.run(source, None, target, shard_size=20_000)  # a previous version of the target
    before = digest(target)
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {source.name}\ntarget: out\nshard_size: 20KB\nsteps: {steps}\n")
    run = paused.start(paused.cli("run", str(config), "--no-progress"), "writing", cache=tmp_path / "cache")
    change(changed)
    result = run.resume()
    errors = [line for line in result.stderr.splitlines() if line.startswith("statebridge: error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # a failed run
    assert len(errors) == 1 and str(changed) in errors[0], errors
    if change is not _remove:  # a removed file may fail the next read first, which names it too
        assert errors[0] == f"statebridge: error: {changed}: {message}, so the tensors read may mix two versions; nothing was committed"
    assert digest(target) == before and paused.hidden(tmp_path) == []


def test_identity_check_in_process(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(state(0.0), path)
    with sb.open_source(path) as source:
        assert source.files() == [path]
        identity = source.identity()
        identity.check()  # unchanged
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
        with pytest.raises(SourceError, match=r"a\.safetensors: was modified during the run"):
            identity.check()


def test_files_of_each_kind_of_source(tmp_path, llama_file):
    sb.run(llama_file, None, tmp_path / "shards", shard_size=60_000)
    with sb.open_source(tmp_path / "shards") as shards:
        assert shards.files() == sorted((tmp_path / "shards").glob("*.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    with sb.open_source(tmp_path / "w.pt") as pickle:
        assert pickle.files() == [tmp_path / "w.pt"]
    with sb.open_source({"w": torch.ones(2)}) as memory:
        assert memory.files() == [] and memory.identity().files == ()
