"""Nothing lost, nothing touched, on the way in and out (issue 9): readers account for every tensor
a file holds or refuse it in one line, writers refuse names their format cannot store, keys of any
spelling are shown and planned without a traceback, and metadata is carried, reserved and checked.

Adversarial files are written with the real libraries (safetensors, torch.save, gguf) and then
damaged or arranged on purpose; the command line runs in-process (``statebridge.cli.main``), so an
uncaught exception fails the test as a traceback would fail a user.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge import ConfigError, SourceError
from statebridge.cli import main
from statebridge.planning.fingerprint import fingerprint
from statebridge.plugins import installed
from statebridge.tensors.provenance import FINGERPRINT_KEY, LINEAGE_KEY, VERSION_KEY
from statebridge.readers import SafetensorsFile, open_source
from statebridge.readers.gguf import GGUFSource
from statebridge.readers.safetensors import INDEX_NAME
from statebridge.tensors.patterns import compress_keys

sys.path.insert(0, str(Path(__file__).parent))
import material  # noqa: E402


def _t(n: int, start: float = 0.0) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + start


def _refused(path: Path, *fragments: str) -> str:
    """Opening ``path`` fails with one SourceError line naming each fragment."""
    with pytest.raises(SourceError) as info:
        open_source(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process: (exit code, stdout, stderr without plugin warnings)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    errors = "\n".join(line for line in err.splitlines() if not line.startswith("statebridge: warning:"))
    return code, out, errors


def _one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statebridge: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _raw_safetensors(path: Path, keys: list[str], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file with these names (one float32 each), header written by json.dumps (escapes and all)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for i, key in enumerate(keys):
        header[key] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + np.arange(len(keys), dtype=np.float32).tobytes())
    return path


def _config(path: Path, **fields: object) -> Path:
    """A JSON config (JSON can spell any string, surrogates and NUL included)."""
    path.write_text(json.dumps(fields))
    return path


# -- sharded safetensors: every tensor of every shard, or a refusal naming file and key ------------------


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Two shards and an index, as save_pretrained lays them out."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": _t(2), "b": _t(3)}, folder / "model-00001-of-00002.safetensors")
    save_file({"c": _t(4)}, folder / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 36}, "weight_map": weight_map}))
    assert set(open_source(folder).metas()) == {"a", "b", "c"}
    return folder


def _edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    edit(index)
    (folder / INDEX_NAME).write_text(json.dumps(index))


def test_index_that_omits_a_tensor_its_shard_holds_is_refused(sharded: Path) -> None:
    _edit_index(sharded, lambda i: i["weight_map"].pop("b"))
    _refused(sharded, "model-00001-of-00002.safetensors", "'b'", "does not list it")
    _refused(sharded / INDEX_NAME, "'b'", "does not list it")  # naming the index itself changes nothing


def test_index_that_puts_a_tensor_in_another_shard_is_refused(sharded: Path) -> None:
    """Both shards hold 'c', the index says the second: the first one's copy would vanish."""
    save_file({"a": _t(2), "b": _t(3), "c": _t(4, 100.0)}, sharded / "model-00001-of-00002.safetensors")
    _refused(sharded, "model-00001-of-00002.safetensors", "'c'", "puts it in model-00002-of-00002.safetensors")


def test_empty_weight_map_is_refused(sharded: Path) -> None:
    _edit_index(sharded, lambda i: i.update(weight_map={}))
    _refused(sharded, INDEX_NAME, "weight_map is empty")
    _refused(sharded / INDEX_NAME, INDEX_NAME, "weight_map is empty")


def test_shard_in_the_folder_that_the_index_does_not_name(sharded: Path) -> None:
    save_file({"d": _t(5)}, sharded / "model-extra.safetensors")
    _refused(sharded, "model-extra.safetensors", "does not name it", f"open {sharded / INDEX_NAME} itself")
    # naming the index file itself reads exactly the shards it names: the stray file is not part of it
    assert set(open_source(sharded / INDEX_NAME).metas()) == {"a", "b", "c"}
    # a shard dropped from the index (its tensors too) is also a file the index does not name
    (sharded / "model-extra.safetensors").unlink()
    _edit_index(sharded, lambda i: i["weight_map"].pop("c"))
    _refused(sharded, "model-00002-of-00002.safetensors", "does not name it")


def test_index_that_is_a_fifo_is_refused_not_skipped(sharded: Path) -> None:
    (sharded / INDEX_NAME).unlink()
    os.mkfifo(sharded / INDEX_NAME)
    _refused(sharded, INDEX_NAME, "is a FIFO")


def test_index_key_that_is_not_text_is_refused(sharded: Path) -> None:
    _edit_index(sharded, lambda i: i["weight_map"].update({"\ud800": "model-00002-of-00002.safetensors"}))
    _refused(sharded, INDEX_NAME, "lone surrogate")


def test_cli_inspect_of_a_folder_with_a_lost_tensor_is_one_line(sharded: Path, capsys) -> None:
    _edit_index(sharded, lambda i: i["weight_map"].pop("b"))
    code, out, err = _cli(capsys, "inspect", sharded)
    _one_error_line(code, err, "model-00001-of-00002.safetensors", "'b'")
    assert out == ""


# -- torch pickles: lists, tuples and dicts flattened; unreadable tensors refused ----------------------


def test_tensors_in_lists_and_tuples_are_named_by_index(tmp_path: Path) -> None:
    w, t0, t1, x, y, z = (_t(i + 1, 10.0 * i) for i in range(6))
    torch.save({"w": w, "layers": [t0, t1], "d": {"x": (x, {"y": y})}, "pair": (z, 3)}, tmp_path / "nested.pt")
    source = open_source(tmp_path / "nested.pt")
    assert list(source.metas()) == ["w", "layers.0", "layers.1", "d.x.0", "d.x.1.y", "pair.0"]
    for key, expected in {"w": w, "layers.0": t0, "layers.1": t1, "d.x.0": x, "d.x.1.y": y, "pair.0": z}.items():
        assert torch.equal(source.load(key), expected), key
    assert source.skipped == ["pair.1"]


def test_a_list_of_state_dicts_is_named_as_module_list_names_it(tmp_path: Path) -> None:
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)])
    torch.save({"layers": [layer.state_dict() for layer in layers]}, tmp_path / "list.pt")
    source = open_source(tmp_path / "list.pt")
    assert list(source.metas()) == [f"layers.{k}" for k in layers.state_dict()]
    for key, tensor in layers.state_dict().items():
        assert torch.equal(source.load(f"layers.{key}"), tensor)


def test_non_tensor_values_are_listed_once_per_tensor_free_part(tmp_path: Path) -> None:
    torch.save({"w": _t(2), "cfg": {"lr": 0.1, "betas": (0.9, 0.99)}, "history": [1, 2, 3], "opt": {"state": [_t(1)], "lr": 0.1}}, tmp_path / "c.pt")
    source = open_source(tmp_path / "c.pt")
    assert list(source.metas()) == ["w", "opt.state.0"]
    assert source.skipped == ["cfg", "history", "opt.lr"]
    # a file with no tensor at all lists its top-level values
    torch.save({"epoch": 3, "tags": ["a"]}, tmp_path / "none.pt")
    assert open_source(tmp_path / "none.pt").skipped == ["epoch", "tags"]


def test_cli_inspect_names_list_items_and_says_what_is_not_a_tensor(tmp_path: Path, capsys) -> None:
    torch.save({"w": _t(2), "layers": [_t(3), _t(3)], "epoch": 7}, tmp_path / "n.pt")
    code, out, err = _cli(capsys, "inspect", tmp_path / "n.pt")
    assert code == 0, err
    assert "layers.{0..1}" in out and "3 tensors" in out
    assert "1 values that are not tensors are not part of the state: epoch" in out


def test_list_index_that_collides_with_a_dotted_key_is_refused(tmp_path: Path) -> None:
    torch.save({"layers.0": _t(1), "layers": [_t(2)]}, tmp_path / "clash.pt")
    _refused(tmp_path / "clash.pt", "clash.pt", "'layers.0'", "same key")


def _unreadable_tensors() -> dict[str, object]:
    dense = torch.eye(3)
    return {
        "sparse_coo": (lambda: dense.to_sparse(), "sparse"),
        "sparse_csr": (lambda: dense.to_sparse_csr(), "sparse"),
        "meta": (lambda: torch.empty(3, device="meta"), "meta device"),
        "quantized": (lambda: torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8), "quantized"),
        "nested": (lambda: torch.nested.nested_tensor([_t(2), _t(3)]), "nested"),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch calls sparse CSR and nested tensors beta/prototype
@pytest.mark.parametrize("kind", list(_unreadable_tensors()))
def test_unreadable_tensor_in_a_pickle_is_refused_naming_file_and_key(tmp_path: Path, kind: str) -> None:
    make, words = _unreadable_tensors()[kind]
    torch.save({"ok": _t(2), "deep": [{"bad": make()}]}, tmp_path / f"{kind}.pt")
    _refused(tmp_path / f"{kind}.pt", f"{kind}.pt", "'deep.0.bad'", words)
    if kind != "meta":  # a state dict in memory gets the same check; meta tensors there describe a target
        with pytest.raises(SourceError, match=f"'x' .*{words}"):
            open_source({"x": make()})


def test_meta_tensors_in_memory_still_describe_a_target() -> None:
    assert open_source({"x": torch.empty(3, device="meta")}).metas()["x"].shape == (3,)


def test_tensors_in_a_set_are_refused(tmp_path: Path) -> None:
    torch.save({"w": _t(1), "s": {_t(2)}}, tmp_path / "set.pt")
    _refused(tmp_path / "set.pt", "set.pt", "'s'", "set")


def test_surrogate_key_in_a_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"a\ud800": _t(1)}, tmp_path / "s.pt")
    _refused(tmp_path / "s.pt", "s.pt", "lone surrogate")


def _tree() -> st.SearchStrategy:
    leaves = st.one_of(st.integers(0, 9).map(lambda n: ("tensor", n)), st.sampled_from([1, 0.5, "s", None, True]))
    names = st.sampled_from(["a", "b", "c", "d"])
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.dictionaries(names, inner, max_size=3), st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple)),
        max_leaves=12,
    )


def _build(tree, counter: list[int]):
    """The checkpoint object for ``tree`` (every ("tensor", n) a distinct tensor) and its expected flat state."""
    expected: dict[str, torch.Tensor] = {}

    def make(node, prefix: str):
        if isinstance(node, tuple) and len(node) == 2 and node[0] == "tensor":
            counter[0] += 1
            tensor = torch.full((node[1] + 1,), float(counter[0]))
            expected[prefix] = tensor
            return tensor
        if isinstance(node, dict):
            return {k: make(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [make(v, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return make(tree, ""), expected


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["m", "n", "o"]), _tree(), min_size=1, max_size=3))
def test_every_tensor_in_a_pickle_is_in_the_state_property(tmp_path: Path, tree) -> None:
    """Whatever the nesting, each tensor the file holds is in the state under its path, with its values."""
    obj, expected = _build(tree, [0])
    path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.pt"
    torch.save(obj, path)
    source = open_source(path)
    assert set(source.metas()) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(source.load(key), tensor), key


# -- FIFOs and devices: refused at once, never read (a read would block forever) -------------------------


def _inspect_in_a_process(path: Path) -> list[str]:
    """``statebridge inspect path`` in its own process: a reader that opened a FIFO would hang there,
    and the timeout turns that into a failure instead of a hung test run.  Its error lines."""
    done = subprocess.run([*material.statebridge_cli(), "inspect", str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("statebridge: warning:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    return errors


@pytest.mark.parametrize("name", ["pipe", "pipe.safetensors", "pipe.gguf", "pipe.pt", "pipe.index.json"])
def test_fifo_is_refused_by_inspect_not_waited_on(tmp_path: Path, name: str) -> None:
    os.mkfifo(tmp_path / name)
    assert _inspect_in_a_process(tmp_path / name) == [
        f"statebridge: error: {tmp_path / name}: is a FIFO, not a checkpoint file; statebridge reads checkpoints from regular files"
    ]
    _refused(tmp_path / name, "is a FIFO")  # and in this process, now that it is known not to hang


def test_fifo_shard_and_devices_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    save_file({"a": _t(1)}, folder / "a.safetensors")
    os.mkfifo(folder / "b.safetensors")
    [line] = _inspect_in_a_process(folder)
    assert f"{folder / 'b.safetensors'}: is a FIFO" in line
    _refused(Path("/dev/null"), "/dev/null", "is a character device")
    with pytest.raises(SourceError, match="is a folder"):
        SafetensorsFile(folder)


# -- keys of any spelling: shown, planned, written, or refused in one line -------------------------------


def test_compress_keys_keeps_every_key_whatever_its_spelling() -> None:
    huge = "9" * 5000  # longer than Python converts to int by default
    keys = ["a#b.0", "a#b.1", "a.#.1", f"layers.{huge}.w", "l.007.x", "l.7.x", "x\x00y", "e\x1b[2Jz"]
    assert compress_keys(keys) == ["a#b.{0..1}", "a.#.1", f"layers.{huge}.w", "l.007.x", "l.7.x", "x\\x00y", "e\\x1b[2Jz"]


def test_cli_inspect_plan_and_run_with_odd_keys(tmp_path: Path, capsys) -> None:
    huge = "9" * 5000
    source = tmp_path / "odd.safetensors"
    save_file({"a#b.0": _t(2), "a#b.1": _t(2, 5.0), f"layers.{huge}.w": _t(3), "layers.1.w": _t(3)}, source)
    code, out, err = _cli(capsys, "inspect", source)
    assert code == 0, err
    assert "a#b.{0..1}" in out and f"layers.{huge}.w" in out and "4 tensors" in out

    config = _config(
        tmp_path / "odd.json",
        source=str(source),
        target=str(tmp_path / "out.safetensors"),
        steps=[{"rename": {"pattern": f"layers.{huge}.w", "to": "big.#.w"}}, {"rename": {"pattern": "a#b.*", "to": "hash.*"}}],
    )
    code, out, err = _cli(capsys, "plan", config)
    assert code == 0, err
    code, out, err = _cli(capsys, "run", config, "--no-progress")
    assert code == 0, err
    written = load_file(tmp_path / "out.safetensors")
    assert set(written) == {"big.#.w", "hash.0", "hash.1", "layers.1.w"}
    assert torch.equal(written["big.#.w"], _t(3)) and torch.equal(written["hash.1"], _t(2, 5.0))


def test_nul_and_control_characters_in_keys_are_written_and_shown_escaped(tmp_path: Path, capsys) -> None:
    source = _raw_safetensors(tmp_path / "ctl.safetensors", ["a\x00b", "c\x1b[31md", "ok"])
    config = _config(tmp_path / "c.json", source=str(source), target=str(tmp_path / "out.safetensors"), steps=[{"rename": {"pattern": "ok", "to": "x\u0000y"}}])
    code, _, err = _cli(capsys, "run", config, "--no-progress")
    assert code == 0, err
    with safe_open(tmp_path / "out.safetensors", "pt") as f:  # the reference reader reads the names back
        assert set(f.keys()) == {"a\x00b", "c\x1b[31md", "x\x00y"}
    code, out, err = _cli(capsys, "inspect", tmp_path / "out.safetensors", "--lineage")
    assert code == 0, err
    assert "a\\x00b" in out and "c\\x1b[31md" in out and "x\\x00y" in out
    assert "\x1b" not in out and "\x00" not in out.split("lineage:")[0]


def test_surrogate_in_a_source_key_is_one_line(tmp_path: Path, capsys) -> None:
    path = _raw_safetensors(tmp_path / "sur.safetensors", ["a\ud800b", "ok"])  # json.dumps writes "\ud800"
    code, _, err = _cli(capsys, "inspect", path)
    _one_error_line(code, err, "sur.safetensors", "'a\\ud800b'", "lone surrogate")
    path = _raw_safetensors(tmp_path / "meta.safetensors", ["ok"], metadata={"k": "v\udfff"})
    code, _, err = _cli(capsys, "inspect", path)
    _one_error_line(code, err, "meta.safetensors", "__metadata__ entry 'k'", "lone surrogate")


@pytest.mark.parametrize("target", ["a\ud800", "\udc80x.weight"])
def test_surrogate_in_a_rename_target_is_one_line(tmp_path: Path, capsys, target: str) -> None:
    save_file({"w": _t(1)}, tmp_path / "s.safetensors")
    for suffix in ("safetensors", "gguf", "pt"):
        config = _config(
            tmp_path / "c.json", source=str(tmp_path / "s.safetensors"), target=str(tmp_path / f"o.{suffix}"),
            steps=[{"rename": {"pattern": "w", "to": target}}],
        )
        for command in ("plan", "run"):
            code, _, err = _cli(capsys, command, config)
            _one_error_line(code, err, "steps[0] (rename)", "lone surrogate")
        assert not (tmp_path / f"o.{suffix}").exists()


@pytest.mark.parametrize("how", ["exact", "regex", "python"])
def test_tensor_renamed_to_metadata_is_refused_before_writing(tmp_path: Path, capsys, how: str) -> None:
    save_file({"w": _t(2), "v": _t(1)}, tmp_path / "s.safetensors")
    target = tmp_path / "o.safetensors"
    step = {"exact": {"pattern": "w", "to": "__metadata__"}, "regex": {"pattern": "re:(w)", "to": "__metadata__"}}.get(how)
    if how == "python":
        with pytest.raises(ConfigError, match=r"'__metadata__' \(made by rename from 'w'\).*safetensors keeps that name"):
            sb.run(tmp_path / "s.safetensors", [sb.Rename(pattern="w", to="__metadata__")], target)
    else:
        config = _config(tmp_path / "c.json", source=str(tmp_path / "s.safetensors"), target=str(target), steps=[{"rename": step}])
        for command in ("plan", "run"):
            code, _, err = _cli(capsys, command, config)
            _one_error_line(code, err, "'__metadata__'", "made by rename from 'w'", "safetensors keeps that name")
    assert not target.exists()
    # a sharded target refuses it too; torch and GGUF store the name as any other
    with pytest.raises(ConfigError, match="safetensors keeps that name"):
        sb.run(tmp_path / "s.safetensors", [sb.Rename(pattern="w", to="__metadata__")], tmp_path / "shards", shard_size=4)
    sb.run(tmp_path / "s.safetensors", [sb.Rename(pattern="w", to="__metadata__")], tmp_path / "o.pt")
    assert torch.equal(open_source(tmp_path / "o.pt").load("__metadata__"), _t(2))


# -- metadata: carried within a format, reserved, checked ------------------------------------------------


def _st_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_safetensors_metadata_is_carried_and_statebridge_keys_are_replaced(tmp_path: Path) -> None:
    source = tmp_path / "s.safetensors"
    forged = {"statebridge.fingerprint": "forged", "statebridge.lineage": "{}", "statebridge.custom": "x"}
    save_file({"a": _t(2), "b": _t(3)}, source, metadata={"format": "pt", "origin": "llama-3", "license": "mit", **forged})
    steps = [sb.Rename(pattern="a", to="A")]
    sb.run(source, steps, tmp_path / "o.safetensors", metadata={"license": "apache-2.0", "note": "converted"})
    stored = _st_metadata(tmp_path / "o.safetensors")
    assert stored["origin"] == "llama-3" and stored["format"] == "pt"
    assert stored["license"] == "apache-2.0" and stored["note"] == "converted"  # the run's metadata wins
    assert stored[FINGERPRINT_KEY] == sb.plan(source, steps, metadata={"license": "apache-2.0", "note": "converted"}).fingerprint
    assert json.loads(stored[LINEAGE_KEY]) == {"A": {"from": ["a"], "ops": ["rename"]}}
    assert "statebridge.custom" not in stored and stored[VERSION_KEY] == sb.__version__

    # a second run over the first one's output: its provenance replaces the first run's
    sb.run(tmp_path / "o.safetensors", None, tmp_path / "o2.safetensors")
    again = _st_metadata(tmp_path / "o2.safetensors")
    assert again[FINGERPRINT_KEY] == fingerprint(sb.Pipeline([]), installed().providers()) != stored[FINGERPRINT_KEY]
    assert json.loads(again[LINEAGE_KEY]) == {}
    assert again["origin"] == "llama-3" and again["note"] == "converted"


def test_sharded_metadata_is_carried_and_total_size_recomputed(sharded: Path, tmp_path: Path) -> None:
    save_file({"c": _t(4)}, sharded / "model-00002-of-00002.safetensors", metadata={"format": "pt", "origin": "x"})
    sb.run(sharded, [sb.Drop(keys=["a"])], tmp_path / "out", shard_size=12)
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 28  # b and c: 12 + 16 bytes, not the source's 36
    assert index["metadata"]["origin"] == "x"
    for shard in set(index["weight_map"].values()):
        stored = _st_metadata(tmp_path / "out" / shard)
        assert stored["origin"] == "x" and "total_size" not in stored


@pytest.mark.parametrize(
    "metadata, words",
    [
        ({"statebridge.fingerprint": "0" * 64}, "'statebridge.fingerprint' is reserved"),
        ({"statebridge.lineage": "{}"}, "'statebridge.lineage' is reserved"),
        ({"statebridge.anything": "x"}, "'statebridge.anything' is reserved"),
        ({"a": {"b": 1}}, "metadata 'a': the value {'b': 1} is a dict"),
        ({"a": [["x"]]}, "metadata 'a': an item ['x'] is a list"),
        ({"a": []}, "metadata 'a': the value is an empty list"),
        ({"a": None}, "metadata 'a': cannot delete it: the source carries no such field"),
        ({1: "x"}, "metadata key 1 is a int, not a string"),
        ({"a": "\ud800"}, "metadata 'a': the value holds"),
    ],
)
def test_metadata_a_caller_may_not_set(tmp_path: Path, metadata: dict, words: str) -> None:
    save_file({"w": _t(1)}, tmp_path / "s.safetensors")
    for target in ("o.safetensors", "o.gguf"):
        with pytest.raises(ConfigError) as info:
            sb.run(tmp_path / "s.safetensors", None, tmp_path / target, metadata=metadata)
        assert words in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / target).exists()


def test_config_may_not_forge_provenance(tmp_path: Path, capsys) -> None:
    save_file({"w": _t(1)}, tmp_path / "s.safetensors")
    config = _config(tmp_path / "c.json", source=str(tmp_path / "s.safetensors"), target=str(tmp_path / "o.safetensors"), metadata={"statebridge.fingerprint": "forged"})
    for command in ("plan", "run"):
        code, _, err = _cli(capsys, command, config)
        _one_error_line(code, err, "'statebridge.fingerprint' is reserved")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "lineage, why",
    [
        ("not json at all", "it is not JSON"),
        ("[1, 2]", "it is a JSON list"),
        ('{"w": 1}', "its entry for 'w'"),
        ('{"w": {"from": "v", "ops": []}}', "its entry for 'w'"),
        ('{"w": {"from": ["\\ud800"], "ops": []}}', "its entry for 'w'"),
    ],
)
def test_third_party_lineage_that_is_not_ours_is_ignored_with_a_note(tmp_path: Path, capsys, lineage: str, why: str) -> None:
    path = tmp_path / "third.safetensors"
    save_file({"w": _t(1)}, path, metadata={LINEAGE_KEY: lineage})
    for argv in (["inspect", path], ["inspect", path, "--lineage"], ["analyze", "summary", path], ["inspect", path, "--json"]):
        code, out, err = _cli(capsys, *argv)
        assert code == 0, (argv, err)
    code, out, _ = _cli(capsys, "inspect", path, "--lineage")
    assert f"{LINEAGE_KEY} ignored: {why}" in out and "lineage: none recorded" in out


def _gguf_with_fields(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_token_list(["<s>", "</s>", "a"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.25])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_string("statebridge.fingerprint", "from-an-earlier-run")
    writer.add_tensor("blk.0.w", np.arange(32, dtype=np.float16).reshape(2, 16))
    writer.add_tensor("norm", np.ones(16, dtype=np.float32))
    writer.add_tensor("blk.1.w", gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_to_gguf_keeps_every_field_with_its_type(tmp_path: Path) -> None:
    source = GGUFSource(_gguf_with_fields(tmp_path / "s.gguf"))
    sb.run(source, [sb.Rename(pattern="norm", to="output_norm.weight")], tmp_path / "o.gguf", metadata={"general.name": "renamed"})
    out = GGUFSource(tmp_path / "o.gguf")
    for key, field in source.typed_fields.items():
        if key in ("general.name", "general.file_type") or key.startswith("statebridge."):
            continue
        assert out.typed_fields[key] == field, key
    assert out.fields["general.architecture"] == "llama"
    assert out.fields["general.name"] == "renamed"  # the run's metadata wins
    assert out.fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0  # blk.1.w kept its Q8_0 blocks
    steps = sb.Pipeline([sb.Rename(pattern="norm", to="output_norm.weight")])
    assert out.fields[FINGERPRINT_KEY] == fingerprint(steps, installed().providers(), metadata={"general.name": "renamed"})
    # and gguf's own reader agrees
    reader = gguf.GGUFReader(tmp_path / "o.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert reader.fields["llama.block_count"].parts[-1][0] == 2


def test_gguf_file_type_follows_the_tensors_written(tmp_path: Path) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    sb.run(source, [sb.Cast(pattern="**", dtype="float16")], tmp_path / "half.gguf")
    assert GGUFSource(tmp_path / "half.gguf").fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_metadata_is_not_carried_across_formats(tmp_path: Path) -> None:
    gguf_source = _gguf_with_fields(tmp_path / "s.gguf")
    sb.run(gguf_source, None, tmp_path / "from-gguf.safetensors")
    stored = _st_metadata(tmp_path / "from-gguf.safetensors")
    assert not any(k.startswith(("general.", "llama.", "tokenizer.")) for k in stored)
    save_file({"w": _t(16)}, tmp_path / "s.safetensors", metadata={"origin": "x"})
    sb.run(tmp_path / "s.safetensors", None, tmp_path / "from-st.gguf")
    assert "origin" not in GGUFSource(tmp_path / "from-st.gguf").fields


# -- the real Gemma 3 270M GGUF ------------------------------------------------------------------------




def test_gemma_gguf_to_gguf_keeps_its_architecture_and_every_field(gemma_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "gemma_path-out.gguf"
    sb.run(gemma_path, None, target, progress=False, durable=False)
    source, out = GGUFSource(gemma_path), GGUFSource(target)
    assert out.fields["general.architecture"] == "gemma3"
    gemma3 = [k for k in source.typed_fields if k.startswith("gemma3.")]
    assert len(gemma3) >= 10
    for key, field in source.typed_fields.items():
        assert out.typed_fields[key] == field, key  # general.file_type too: every tensor kept its type
    assert len(out.fields["tokenizer.ggml.tokens"]) == 262144
    assert set(out.typed_fields) == set(source.typed_fields) | {VERSION_KEY, FINGERPRINT_KEY, LINEAGE_KEY}
    assert list(out.metas()) == list(source.metas())
    assert torch.equal(out.load("blk.0.attn_q.weight"), source.load("blk.0.attn_q.weight"))
