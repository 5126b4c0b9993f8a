"""The target policy's verdicts, checked where mutation testing found the suite blind (docs/testing.md, Score).

What the dry run prints and a run reports about an existing target is compared whole: how many
files a previous output holds, whether ``--overwrite`` was needed, and which entry of a folder
makes it one statebridge did not write (a symbolic link, even to a statebridge file, is never
trusted; the companion files a provenance lists are).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import statebridge as sb
from statebridge.errors import ConfigError
from statebridge.execute.targets import TargetPolicy, Verdict
from statebridge.tensors.provenance import COMPANIONS_KEY, FINGERPRINT_KEY

STATE = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, 2)}


def verdict(target: Path, overwrite: bool = False) -> Verdict:
    return TargetPolicy(target, folder=True, source=sb.DictSource(STATE), overwrite=overwrite).check()


def refusal(target: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        verdict(target)
    return str(caught.value)


def ours(path: Path, **metadata: str) -> Path:
    """A safetensors file carrying statebridge's provenance (and ``metadata``)."""
    save_file({"w": torch.ones(2)}, path, metadata={FINGERPRINT_KEY: "0" * 64, **metadata})
    return path


def test_the_verdict_on_a_new_target_and_on_previous_outputs_counts_their_files(tmp_path):
    assert str(verdict(tmp_path / "new")) == f"{tmp_path / 'new'} (new)"
    one = tmp_path / "one"
    sb.run(STATE, None, one, progress=False)
    assert [p.name for p in one.iterdir()] == ["model.safetensors"]
    assert str(verdict(one)) == f"{one} exists (a folder statebridge wrote, 1 file); the run replaces it"
    three = tmp_path / "three"
    sb.run(STATE, None, three, shard_size=30, progress=False)
    assert len(list(three.iterdir())) == 3  # two shards and the index
    assert str(verdict(three)) == f"{three} exists (a folder statebridge wrote, 3 files); the run replaces it"


def test_the_verdict_says_when_overwrite_was_needed(tmp_path):
    target = tmp_path / "user"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert str(verdict(target, overwrite=True)) == (
        f"{target} exists (a folder holding 'notes.txt', which statebridge did not write); "
        "the run replaces it, as --overwrite allows"
    )


def test_a_link_to_a_statebridge_file_inside_a_folder_is_not_trusted(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    ours(target / "model.safetensors")
    os.symlink(ours(tmp_path / "elsewhere.safetensors"), target / "extra.safetensors")
    assert refusal(target) == (
        f"target {target} is a folder holding 'extra.safetensors', which statebridge did not write; refusing to "
        "replace it: choose another target, or pass --overwrite (overwrite: true in a config, overwrite=True in "
        "Python) to replace it"
    )


def test_the_companions_a_provenance_lists_belong_to_the_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    ours(target / "model.safetensors", **{COMPANIONS_KEY: '["config.json"]'})
    (target / "config.json").write_text("{}")
    assert str(verdict(target)) == f"{target} exists (a folder statebridge wrote, 2 files); the run replaces it"
    (target / "tokenizer.json").write_text("{}")  # not listed
    assert "a folder holding 'tokenizer.json', which statebridge did not write" in refusal(target)



def test_a_link_to_a_folder_inside_a_folder_is_not_trusted(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    ours(target / "model.safetensors")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", target / "more", target_is_directory=True)
    assert "a folder holding 'more', which statebridge did not write" in refusal(target)


@pytest.mark.parametrize("index", ["[1]", '{"metadata": {}}', '{"metadata": [1]}', '{"weight_map": {}}'])
def test_an_index_without_statebridge_provenance_is_foreign(tmp_path, index):
    target = tmp_path / "out"
    target.mkdir()
    ours(target / "model-00001-of-00001.safetensors")
    (target / "model.safetensors.index.json").write_text(index)
    assert "a folder holding 'model.safetensors.index.json', which statebridge did not write" in refusal(target)


def test_a_torch_suffix_is_never_recognised_even_over_a_statebridge_file(tmp_path):
    """docs/trust.md: torch files carry no provenance, so an existing ``.pt`` needs ``overwrite`` whatever it holds."""
    target = ours(tmp_path / "model.pt")
    assert refusal(target) == (
        f"target {target} is a file statebridge did not write (torch files carry no provenance to tell); refusing "
        "to replace it: choose another target, or pass --overwrite (overwrite: true in a config, overwrite=True in "
        "Python) to replace it"
    )


def test_a_folder_that_cannot_be_listed_is_one_line_naming_it(tmp_path, monkeypatch):
    """A subfolder ``os.walk`` cannot open (EACCES for a user who may not read it) is an error, not skipped."""
    target = tmp_path / "out"
    (target / "locked").mkdir(parents=True)
    ours(target / "model.safetensors")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(target / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert refusal(target) == f"target {target}: cannot list it: Permission denied"


_OVERWRITE = "pass --overwrite (overwrite: true in a config, overwrite=True in Python) to replace it"


def test_a_file_of_someone_else_and_a_fifo_are_named_for_what_they_are(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, foreign)
    assert refusal(foreign) == (
        f"target {foreign} is a file statebridge did not write; refusing to replace it: choose another target, or {_OVERWRITE}"
    )
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert refusal(fifo) == (
        f"target {fifo} is neither a regular file nor a folder; refusing to replace it: choose another target, or {_OVERWRITE}"
    )


def test_a_target_that_cannot_be_looked_at_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out"
    assert refusal(target) == f"target {target}: cannot look at it: Not a directory"


def test_an_in_place_conversion_says_it_replaces_the_source_as_overwrite_allows(tmp_path):
    source = tmp_path / "model.safetensors"
    save_file(STATE, source)
    with sb.open_source(source) as opened:
        found = TargetPolicy(source, folder=False, source=opened, named=source, overwrite=True).check()
    assert str(found) == f"{source} exists (the source, a file statebridge did not write); the run replaces it, as --overwrite allows"


def _policy_on_folder(tmp_path: Path, target: Path) -> TargetPolicy:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    save_file(STATE, folder / "model.safetensors")
    return TargetPolicy(target, folder=True, source=sb.open_source(folder), named=folder)


def test_a_target_beside_a_source_folder_is_new_and_one_inside_or_around_it_is_refused_exactly(tmp_path):
    beside = tmp_path / "out"
    assert str(_policy_on_folder(tmp_path, beside).check()) == f"{beside} (new)"
    inside = tmp_path / "ckpt" / "out"
    with pytest.raises(ConfigError) as caught:
        _policy_on_folder(tmp_path, inside).check()
    assert str(caught.value) == (
        f"target {inside} lies inside the source folder {tmp_path / 'ckpt'}; writing there would change the "
        "input: choose a target outside it"
    )
    with pytest.raises(ConfigError) as caught:
        _policy_on_folder(tmp_path, tmp_path).check()
    assert str(caught.value) == (
        f"target {tmp_path} contains the source {tmp_path / 'ckpt' / 'model.safetensors'}; replacing it would "
        "delete the input: choose a target outside it"
    )
