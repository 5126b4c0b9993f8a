"""Bad input: real files (from safetensors, huggingface_hub and torch.save) damaged on purpose.

Every one must fail with a single :class:`SourceError` naming the file (and the
key where there is one), quickly and without allocating what a lying header
claims; pickles that try to run code must be refused before any code runs.  The
CLI must print that one line and exit 2, with no traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from statebridge.errors import SourceError
from statebridge.readers import open_source
from statebridge.readers.safetensors import INDEX_NAME

sys.path.insert(0, str(Path(__file__).parent))
import material  # noqa: E402

TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.weight": torch.ones(3, 4), "c.bias": torch.zeros(5)}


def _open_fails(path: Path, *fragments: str) -> str:
    """Open ``path`` expecting one SourceError that names the file and says each fragment."""
    with pytest.raises(SourceError) as info:
        source = open_source(path)
        for key in source.metas():  # some damage only shows when data is read
            source.load(key)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


def _safetensors(tmp_path: Path, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    save_file(TENSORS, path, metadata={"format": "pt"})
    return path


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors header (``edit`` changes the parsed dict), keeping the data section."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


# -- safetensors -----------------------------------------------------------------------


def test_safetensors_truncated(tmp_path):
    path = _safetensors(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the last tensor's bytes are cut
    _open_fails(path, "'c.bias'", "truncated?")  # c.bias is stored last


def test_safetensors_header_length_larger_than_file(tmp_path):
    path = _safetensors(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 100)
    path.write_bytes(bytes(data))
    _open_fails(path, f"header claims {len(data) + 100} bytes", "truncated?")


def test_safetensors_offsets_past_end_of_file(tmp_path):
    path = _safetensors(tmp_path)

    def push(header):
        begin, end = header["b.weight"]["data_offsets"]
        header["b.weight"]["data_offsets"] = [begin + 4096, end + 4096]

    _rewrite_header(path, push)
    _open_fails(path, "'b.weight'", "data ends at byte", "truncated?")


def test_safetensors_garbage_header_json(tmp_path):
    path = _safetensors(tmp_path)
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b'{"a.weight": {"dtype": "F32", [[[' + b" " * (length - 33)
    path.write_bytes(bytes(data))
    _open_fails(path, "header is not valid JSON", "not a safetensors file?")


def test_safetensors_unknown_dtype(tmp_path):
    path = _safetensors(tmp_path)
    _rewrite_header(path, lambda h: h["c.bias"].update(dtype="F4X"))
    _open_fails(path, "'c.bias'", "unknown dtype 'F4X'", "BF16")


def test_safetensors_offsets_do_not_match_shape_and_dtype(tmp_path):
    path = _safetensors(tmp_path)
    _rewrite_header(path, lambda h: h["a.weight"].update(shape=[4, 4]))  # 64 bytes wanted, 48 stored
    _open_fails(path, "'a.weight'", "span 48 bytes but F32[4, 4] needs 64")


def test_safetensors_overlapping_tensors(tmp_path):
    path = _safetensors(tmp_path)
    _rewrite_header(path, lambda h: h["b.weight"].update(data_offsets=list(h["a.weight"]["data_offsets"])))
    _open_fails(path, "'a.weight'", "'b.weight'", "overlap")


def test_safetensors_petabyte_tensor_is_refused_before_allocating(tmp_path):
    path = _safetensors(tmp_path)
    huge = 10**15

    def claim(header):
        header["b.weight"] = {"dtype": "U8", "shape": [huge], "data_offsets": [0, huge]}

    _rewrite_header(path, claim)
    started = time.perf_counter()
    _open_fails(path, "'b.weight'", "truncated?")
    # a shape that lies about small offsets is caught too
    _rewrite_header(path, lambda h: h["b.weight"].update(dtype="F32", shape=[10**7, 10**7], data_offsets=[48, 96]))
    _open_fails(path, "'b.weight'", "needs 400000000000000 bytes")
    assert time.perf_counter() - started < 1.0


def test_safetensors_empty_and_random_files(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _open_fails(empty, "too short to be safetensors")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(random.Random(0).randbytes(4096))
    _open_fails(noise, "not a safetensors file?")


# -- sharded folders (written by huggingface_hub, the library save_pretrained uses) ------


def _sharded(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_torch_state_dict(TENSORS, folder, max_shard_size=60)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(open_source(folder).metas()) == set(TENSORS)  # intact, it opens
    return folder, index


def test_sharded_missing_shard_file(tmp_path):
    folder, index = _sharded(tmp_path)
    gone = index["weight_map"]["b.weight"]
    (folder / gone).unlink()
    message = _open_fails(folder, INDEX_NAME, f"shard '{gone}' named in the index does not exist")
    assert str(folder / INDEX_NAME) in message


def test_sharded_index_names_a_key_not_in_its_shard(tmp_path):
    folder, index = _sharded(tmp_path)
    shard = index["weight_map"]["a.weight"]
    index["weight_map"]["ghost.weight"] = shard
    (folder / INDEX_NAME).write_text(json.dumps(index))
    _open_fails(folder, INDEX_NAME, "'ghost.weight'", shard, "has no such tensor")


def test_sharded_index_garbage_json(tmp_path):
    folder, _ = _sharded(tmp_path)
    (folder / INDEX_NAME).write_text('{"weight_map": {"a.weight": ')
    _open_fails(folder, INDEX_NAME, "not valid JSON")


def test_sharded_index_pointing_outside_the_folder(tmp_path):
    folder, index = _sharded(tmp_path)
    save_file({"a.weight": torch.ones(3, 4)}, tmp_path / "outside.safetensors")  # exists, but must not be read
    index["weight_map"]["a.weight"] = "../outside.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    _open_fails(folder, INDEX_NAME, "'../outside.safetensors' lies outside the checkpoint folder")
    index["weight_map"]["a.weight"] = str(tmp_path / "outside.safetensors")
    (folder / INDEX_NAME).write_text(json.dumps(index))
    _open_fails(folder, "lies outside the checkpoint folder")


def test_sharded_bad_shard_is_named(tmp_path):
    folder, index = _sharded(tmp_path)
    shard = folder / index["weight_map"]["c.bias"]
    shard.write_bytes(shard.read_bytes()[:-4])
    message = _open_fails(folder, "truncated?")
    assert str(shard) in message


# -- torch pickles ---------------------------------------------------------------------


class _Exec:
    """Unpickling this runs Python code (it writes the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class _System:
    """Unpickling this runs a shell command (it creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _write_payload(path: Path, payload: object, how: str) -> None:
    checkpoint = {"payload": payload, "weight": torch.ones(2)}  # the payload is what the unpickler meets first
    if how == "torch.save":
        torch.save(checkpoint, path)
    elif how == "torch.save legacy":
        torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    else:  # raw pickle.dump, protocol 2 (reaches the GLOBAL opcode) or the default
        with open(path, "wb") as f:
            pickle.dump(checkpoint, f, protocol=2 if how == "pickle p2" else pickle.DEFAULT_PROTOCOL)


def _would_run(path: Path, how: str) -> None:
    """Load the file the unsafe way: proves the payload is live (the marker appears)."""
    if how.startswith("pickle"):
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "torch.save legacy", "pickle p2", "pickle default"])
@pytest.mark.parametrize("payload", [_Exec, _System])
def test_torch_pickle_that_runs_code_is_refused(tmp_path, payload, how):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    _write_payload(path, payload(marker), how)
    message = _open_fails(path, "unpickle", "never runs code")
    if how != "pickle default":  # protocol 5 is refused at its FRAME opcode, before reaching the global
        assert ("needs exec," if payload is _Exec else "system,") in message
    assert not marker.exists()
    _would_run(path, how)  # the control: loaded unsafely, the same file does run code
    assert marker.exists()


def test_torch_zip_truncated(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TENSORS, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        _open_fails(path, "truncated or corrupt")


def test_torch_legacy_truncated(tmp_path):
    path = tmp_path / "model.bin"
    torch.save(TENSORS, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-40])
    _open_fails(path, "not a readable torch checkpoint (truncated or corrupt?)")


def test_random_bytes_with_torch_suffix(tmp_path):
    path = tmp_path / "random.pt"
    noise = random.Random(0).randbytes(4096)
    assert noise[:1] != b"\x80" and noise[:2] != b"PK"
    path.write_bytes(noise)
    _open_fails(path, "not a torch checkpoint", "wrong file?")
    path.write_bytes(b"\x80\x02" + noise)  # looks like a pickle, is not one
    _open_fails(path, "random.pt")
    path.write_bytes(b"")
    _open_fails(path, "file is empty")


def test_nonexistent_path(tmp_path):
    _open_fails(tmp_path / "nowhere" / "model.safetensors", "no such file or folder")


def test_folder_with_nothing_loadable(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hello")
    _open_fails(tmp_path, "found no checkpoint here", "*.safetensors", ".pt")
    torch.save(TENSORS, tmp_path / "a.pt")
    torch.save(TENSORS, tmp_path / "b.bin")
    _open_fails(tmp_path, "found 2 checkpoints here (a.pt, b.bin); name the one to read")


# -- the CLI: one line on stderr, exit 2, no traceback ---------------------------------


def test_cli_reports_bad_input_in_one_line(tmp_path):
    cases: list[Path] = []

    path = _safetensors(tmp_path, "truncated.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    cases.append(path)

    path = _safetensors(tmp_path, "petabyte.safetensors")
    _rewrite_header(path, lambda h: h.update({"huge": {"dtype": "F32", "shape": [250_000_000_000_000], "data_offsets": [0, 10**15]}}))
    cases.append(path)

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    _write_payload(path, _Exec(marker), "torch.save")
    cases.append(path)

    folder, _ = _sharded(tmp_path)
    (folder / INDEX_NAME).write_text("not json")
    cases.append(folder)

    path = tmp_path / "dumped.pt"  # torch warns about its pickle protocol: the warning must not leak out
    _write_payload(path, _System(marker), "pickle default")
    cases.append(path)

    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(1).randbytes(1000))
    cases.append(path)

    cases.append(tmp_path / "missing.safetensors")

    # run them side by side: each start pays for importing torch
    running = [(case, subprocess.Popen([*material.statebridge_cli(), "inspect", str(case)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for case in cases]
    for case, process in running:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (case, stderr)
        assert stdout == "", (case, stdout)
        assert "Traceback" not in stderr, (case, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, (case, stderr)
        assert lines[0].startswith("statebridge: error: "), (case, stderr)
        assert case.name in lines[0], (case, stderr)
    assert not marker.exists()


def test_a_key_named_twice_in_a_header_or_an_index_is_refused(tmp_path):
    """JSON keeps the last of two equal keys silently; a checkpoint that does so is ambiguous."""
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = ('{"w":' + entry + ',"w":' + entry + "}").encode()
    (tmp_path / "twice.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(SourceError, match="header names 'w' twice; which one is meant"):
        open_source(tmp_path / "twice.safetensors")

    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, folder / "a.safetensors")
    (folder / INDEX_NAME).write_text('{"weight_map": {"w": "a.safetensors", "w": "a.safetensors"}}')
    with pytest.raises(SourceError, match="the shard index names 'w' twice"):
        open_source(folder)
