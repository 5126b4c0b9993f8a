"""The target policy: a run never deletes or changes what statebridge did not write, nor its own input.

Every case is tried as a hostile or careless user would: from the command line and from
Python, with symlinks, relative paths and folders of other files.  See docs/trust.md.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import statebridge as sb
from statebridge.cli import main
from statebridge.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
import paused  # noqa: E402


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) with its content's digest, or where a link points."""
    out = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            out[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[name] = "dir"
    return out


def keys(path: Path) -> list[str]:
    with sb.open_source(path) as source:
        return sorted(source.metas())


@pytest.fixture
def project(tmp_path, llama_sd) -> Path:
    """A project folder: an index-less checkpoint folder, a config and a file of the user's."""
    root = tmp_path / "project"
    (root / "ckpt").mkdir(parents=True)
    save_file(llama_sd, root / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    (root / "README.md").write_text("my notes\n")
    (root / "fuse.yaml").write_text("source: ckpt/\ntarget: out/\nsteps:\n  - cast: {dtype: fp16}\n")
    return root


def cli(config: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = main(["run", str(config), "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line (plugin load warnings of the shared environment aside)."""
    lines = [line for line in err.splitlines() if line.startswith("statebridge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- the target and the source ------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("target", [".", "./", "..", "link", "ckpt/.."])
def test_a_target_that_contains_the_source_is_refused_and_nothing_is_touched(project, capsys, target, dry_run):
    """``target: .`` in a project folder replaced the folder: checkpoint, config and notes deleted."""
    (project.parent / "link").symlink_to(project)
    target = "../link" if target == "link" else target
    (project / "fuse.yaml").write_text(f"source: ckpt/\ntarget: {target}\nsteps:\n  - cast: {{dtype: fp16}}\n")
    before = snapshot(project.parent)
    code, out, err = cli(project / "fuse.yaml", *(["--dry-run"] if dry_run else []), capsys=capsys)
    assert code == 2
    assert "contains the source" in error_line(err) and "model.safetensors" in error_line(err)
    assert snapshot(project.parent) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_lets_a_target_contain_the_source(project, overwrite):
    before = snapshot(project)
    with pytest.raises(ConfigError, match="contains the source"):
        sb.run(project / "ckpt", None, project, overwrite=overwrite)
    assert snapshot(project) == before


@pytest.mark.parametrize("where", ["ckpt/out.safetensors", "ckpt/sub/out", "ckpt/out.pt", "alias/out.safetensors"])
def test_a_target_inside_an_index_less_source_folder_is_refused_and_the_source_stays_readable(project, capsys, where):
    """Writing there made the source unreadable: the output became a second shard holding the same keys."""
    (project / "alias").symlink_to(project / "ckpt")
    (project / "fuse.yaml").write_text(f"source: ckpt/\ntarget: {where}\nsteps:\n  - cast: {{dtype: fp16}}\n")
    expected = keys(project / "ckpt")
    before = snapshot(project)
    code, _, err = cli(project / "fuse.yaml", "--overwrite", capsys=capsys)
    assert code == 2 and "lies inside the source folder" in error_line(err)
    assert snapshot(project) == before and keys(project / "ckpt") == expected


def test_a_target_inside_a_sharded_source_folder_is_refused(tmp_path, llama_file):
    sb.run(llama_file, None, tmp_path / "src", shard_size=60_000)
    before = snapshot(tmp_path / "src")
    with pytest.raises(ConfigError, match="lies inside the source folder"):
        sb.run(tmp_path / "src" / "model.safetensors.index.json", None, tmp_path / "src" / "more")
    assert snapshot(tmp_path / "src") == before


@pytest.mark.parametrize("how", ["same path", "symlink", "config"])
def test_the_source_as_its_own_target_needs_overwrite(tmp_path, llama_file, capsys, how):
    source = tmp_path / "model.safetensors"
    sb.run(llama_file, None, source)
    before = source.read_bytes()
    target = source
    if how == "symlink":
        (tmp_path / "link.safetensors").symlink_to(source)
        target = tmp_path / "link.safetensors"
    if how == "config":
        config = tmp_path / "c.yaml"
        config.write_text("source: model.safetensors\ntarget: model.safetensors\nsteps: [{cast: {dtype: fp16}}]\n")
        code, _, err = cli(config, capsys=capsys)
        assert code == 2 and "is the source" in error_line(err) and "--overwrite" in error_line(err)
        assert source.read_bytes() == before
        code, out, err = cli(config, "--overwrite", capsys=capsys)
        assert code == 0, err
        assert "replaced what was there: the source" in out
    else:
        with pytest.raises(ConfigError, match="is the source"):
            sb.run(source, [sb.Cast(dtype="fp16")], target)
        assert source.read_bytes() == before
        if how == "symlink":
            return  # with overwrite the link itself would be replaced: nothing more to check here
        sb.run(source, [sb.Cast(dtype="fp16")], target, overwrite=True)
    with sb.open_source(source) as result:
        assert {m.dtype.name for m in result.metas().values()} == {"float16"}


def test_a_target_beside_a_single_file_source_is_fine(project):
    """The folder that holds a one-file source is not the source: writing next to it is allowed."""
    report = sb.run(project / "ckpt" / "model.safetensors", None, project / "out.safetensors")
    assert report.replaced is None and keys(project / "out.safetensors") == keys(project / "ckpt")


# -- what is already at the target ---------------------------------------------------------------


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "userdir.pt"
    (folder / "sub").mkdir(parents=True)
    (folder / "precious.txt").write_text("years of work")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return folder


def test_a_folder_of_user_files_is_not_replaced_by_a_file(user_folder, llama_file):
    """An existing folder of user files was rmtree'd and replaced by a ``.pt`` file."""
    before = snapshot(user_folder)
    with pytest.raises(ConfigError, match=r"userdir\.pt is a folder holding 'precious\.txt' and other files, which statebridge did not write"):
        sb.run(llama_file, None, user_folder)
    assert snapshot(user_folder) == before and user_folder.is_dir()


def test_overwrite_replaces_a_folder_of_user_files_only_through_the_atomic_swap(user_folder, llama_file, statebridge_cache):
    """With --overwrite the folder is replaced, but only once the new file is complete (it was deleted first)."""
    before = snapshot(user_folder)
    config = user_folder.parent / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: userdir.pt\nsteps: []\n")
    run = paused.start(paused.cli("run", str(config), "--no-progress", "--overwrite"), "commit", cache=statebridge_cache)
    assert snapshot(user_folder) == before  # everything is written, nothing is deleted yet
    result = run.resume()
    assert result.returncode == 0, result.stderr
    assert "replaced what was there: a folder holding 'precious.txt' and other files" in result.stdout
    assert user_folder.is_file() and sorted(torch.load(user_folder, weights_only=True)) == keys(llama_file)


@pytest.mark.parametrize("extra", ["notes.txt", "config.json", "sub/notes.txt", ".hidden"])
def test_a_statebridge_output_with_a_file_added_is_not_replaced(tmp_path, llama_file, extra):
    target = tmp_path / "out"
    sb.run(llama_file, None, target, shard_size=60_000)
    (target / extra).parent.mkdir(exist_ok=True)
    (target / extra).write_text("added by the user")
    before = snapshot(target)
    with pytest.raises(ConfigError, match=rf"a folder holding '{extra}', which statebridge did not write; refusing"):
        sb.run(llama_file, [sb.Cast(dtype="fp16")], target, shard_size=60_000)
    assert snapshot(target) == before
    report = sb.run(llama_file, [sb.Cast(dtype="fp16")], target, shard_size=60_000, overwrite=True)
    assert "which statebridge did not write" in report.replaced and not (target / extra).exists()


@pytest.mark.parametrize("layout", ["shards", "one file", "gguf", "single shard folder"])
def test_a_previous_statebridge_output_is_replaced_and_the_report_says_so(tmp_path, llama_file, capsys, layout):
    name = {"shards": "out", "one file": "out.safetensors", "gguf": "out.gguf", "single shard folder": "out"}[layout]
    shard_size = 60_000 if layout == "shards" else None
    sb.run(llama_file, None, tmp_path / name, shard_size=shard_size)
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: {name}\nsteps: [{{cast: {{dtype: fp16}}}}]\n")
    if shard_size:
        config.write_text(config.read_text() + "shard_size: 60KB\n")
    code, out, err = cli(config, "--dry-run", capsys=capsys)
    assert code == 0 and "the run replaces it" in out and "statebridge wrote" in out
    code, out, err = cli(config, capsys=capsys)
    assert code == 0, err
    assert "replaced what was there: a " in out and "statebridge wrote" in out
    with sb.open_source(tmp_path / name) as result:
        assert {m.dtype.name for m in result.metas().values()} == {"float16"}


def _foreign_gguf(path: Path) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("w", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "name, make, why",
    [
        ("out.safetensors", lambda p, sd: save_file(sd, p, metadata={"format": "pt"}), "a file statebridge did not write"),
        ("out.gguf", lambda p, sd: _foreign_gguf(p), "a file statebridge did not write"),
        ("out.pt", lambda p, sd: torch.save(sd, p), "torch files carry no provenance"),
        ("out.pt", lambda p, sd: sb.run(sd, None, p), "torch files carry no provenance"),
        ("out.safetensors", lambda p, sd: p.write_text("my diary"), "a file statebridge did not write"),
        ("out", lambda p, sd: save_file(sd, p), "a file statebridge did not write"),
        ("out", lambda p, sd: os.mkfifo(p), "neither a regular file nor a folder"),
        ("out", lambda p, sd: (p.mkdir(), save_file(sd, p / "model.safetensors")), "a folder holding 'model.safetensors'"),
    ],
)
def test_a_file_statebridge_did_not_write_needs_overwrite(tmp_path, llama_file, llama_sd, capsys, name, make, why):
    target = tmp_path / name
    make(target, llama_sd)
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: {name}\nsteps: []\n")
    before = snapshot(tmp_path)
    for args in ((), ("--dry-run",)):
        code, _, err = cli(config, *args, capsys=capsys)
        assert code == 2 and why in error_line(err) and "--overwrite" in error_line(err)
        assert snapshot(tmp_path) == before
    config.write_text(config.read_text() + "overwrite: true\n")
    code, out, err = cli(config, capsys=capsys)
    assert code == 0, err
    assert f"replaced what was there: {why}" in out or why in out
    assert keys(target) == keys(llama_file)


def test_a_symlink_target_is_not_followed_or_replaced_without_overwrite(tmp_path, llama_file):
    elsewhere = tmp_path / "elsewhere"
    sb.run(llama_file, None, elsewhere, shard_size=60_000)
    (tmp_path / "out").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"out is a symbolic link \(to .*elsewhere\); refusing"):
        sb.run(llama_file, [sb.Cast(dtype="fp16")], tmp_path / "out", shard_size=60_000)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_empty_target_is_written(tmp_path, llama_file, kind):
    target = tmp_path / ("out" if kind == "folder" else "out.safetensors")
    target.mkdir() if kind == "folder" else target.touch()
    report = sb.run(llama_file, None, target, shard_size=60_000 if kind == "folder" else None)
    assert keys(target) == keys(llama_file) and report.replaced in ("a folder with no files", "an empty file")


def test_the_dry_run_reports_the_verdict_and_writes_nothing(tmp_path, llama_file, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: out\nshard_size: 60KB\nsteps: []\n")
    code, out, _ = cli(config, "--dry-run", capsys=capsys)
    assert code == 0 and f"target: {tmp_path / 'out'} (new)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "llama.safetensors"]
    code, out, _ = cli(config, "--dry-run", "--json", capsys=capsys)
    assert code == 0 and '"target":' in out and "(new)" in out


def test_a_refused_target_is_reported_before_the_bandwidth_probe_writes_anything(tmp_path, llama_file, user_folder, capsys, statebridge_cache):
    (statebridge_cache / "bandwidth.json").unlink(missing_ok=True)  # no seeded measurement: a probe would run and write one
    config = tmp_path / "c.yaml"
    config.write_text(f"source: {llama_file}\ntarget: userdir.pt\nsteps: []\n")
    code, _, err = cli(config, "--dry-run", capsys=capsys)
    assert code == 2 and "userdir.pt" in error_line(err)
    assert not (statebridge_cache / "bandwidth.json").exists()  # the probe never ran


def test_a_subprocess_cli_run_refusal_is_one_line(project):
    """The same through a fresh process: exit status 2, one line, no traceback, nothing touched."""
    (project / "fuse.yaml").write_text("source: ckpt/\ntarget: .\nsteps: []\n")
    before = snapshot(project)
    result = subprocess.run(
        [sys.executable, *paused.cli("run", "fuse.yaml", "--no-progress")],
        cwd=project, env=paused.environment(project.parent / "cache"), capture_output=True, text=True,
    )
    assert result.returncode == 2 and "contains the source" in error_line(result.stderr)
    assert snapshot(project) == before


def test_a_previous_output_whose_header_length_starts_with_0x80_is_recognised(tmp_path):
    """A safetensors header whose length's low byte is 0x80 starts like a pickle: it is still a statebridge output."""
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, tmp_path / "src.safetensors")
    for target in (tmp_path / "out.safetensors", tmp_path / "out"):
        for pad in range(256):  # find the metadata length that makes the header length end in 0x80
            save_file({"a": torch.zeros(3)}, target, metadata={"statebridge.fingerprint": "0" * 64, "pad": "x" * pad})
            if target.read_bytes()[:1] == b"\x80":
                break
        assert target.read_bytes()[:1] == b"\x80"
        assert sb.open_source(target).metas()["a"].shape == (3,)  # sniffed as safetensors, not as a pickle
        report = sb.run(tmp_path / "src.safetensors", None, target, format="safetensors")
        assert report.replaced == "a file statebridge wrote"
