"""The torch pickle reader's exact lines for each kind of broken file, its limits at their boundaries, and its names.

Written against the mutants of ``readers/torch_pickle.py`` that the suite let live (docs/testing.md):
the older tests look for a few words of each message, so a message that lost its
numbers, its key or its cut-off still passed; these compare whole lines, on files
written by ``torch.save`` (or damaged copies of them).
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import pytest
import torch

from statebridge.errors import SourceError
from statebridge.readers.torch_pickle import TorchPickle, _first_sentence, _unpickling_message
from statebridge.testing import mapped_file

NOT_READABLE = "not a readable torch checkpoint (truncated or corrupt?): "
REFUSED = (
    "refused to unpickle: {}; statebridge loads only tensors and plain containers from pickles and never runs code "
    "from a checkpoint (save the state_dict() rather than objects)"
)


def _error(path: Path) -> str:
    with pytest.raises(SourceError) as e:
        TorchPickle(path)
    text = str(e.value)
    assert text.startswith(f"{path}: "), text
    return text[len(f"{path}: ") :]


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_files_that_are_not_torch_checkpoints_get_one_exact_line(tmp_path: Path) -> None:
    cases = {
        b"": "file is empty, not a torch checkpoint",
        b"A": "not a torch checkpoint: starts with bytes 41, not a zip archive (torch.save) or a pickle (legacy torch.save); wrong file?",
        b"AB" + bytes(40): "not a torch checkpoint: starts with bytes 41 42, not a zip archive (torch.save) or a pickle (legacy torch.save); wrong file?",
        b"PK\x05\x06" + bytes(40): "zip archive is damaged: it does not start with a zip entry (corrupt torch checkpoint)",
        b"PK\x03\x04" + bytes(40): "zip archive is incomplete (no central directory): truncated or corrupt torch checkpoint",
        pickle.dumps({"a": 1}, protocol=2): NOT_READABLE + "it is a pickle, but not one written by torch.save",
        b"\x80\x02junk": NOT_READABLE + "its pickle is malformed (error: unpack requires a buffer of 4 bytes)",
        b"\x80\x02cos\nsystem\nq\x00.": REFUSED.format("it needs os.system, which could run code"),
        b"\x80\x02cbuiltins\nexec\n.": REFUSED.format("it needs exec, which could run code"),
        b"\x80\x02B\x00\x00\x00\x00.": "cannot unpickle safely: pickle opcode 66 (0x42) is not one torch.save writes (written by "
        "pickle.dump rather than torch.save, or corrupt?); statebridge never runs code from a checkpoint",
    }
    for i, (data, line) in enumerate(cases.items()):
        path = tmp_path / f"f{i}.pt"
        path.write_bytes(data)
        assert _error(path) == line, data[:20]


def test_a_damaged_zip_checkpoint_gets_torchs_own_first_line(tmp_path: Path) -> None:
    data = _saved({"w": torch.ones(3)})
    path = tmp_path / "m.pt"
    # the local header's name length of data.pkl made huge
    assert data[30:46] == b"archive/data.pkl"
    path.write_bytes(data[:27] + b"\xff" + data[28:])
    assert _error(path) == NOT_READABLE + "PytorchStreamReader failed reading file data.pkl: invalid header or archive is corrupted"
    # a persistent id that is not a storage: the weights-only unpickler's own words, on one line
    path.write_bytes(data.replace(b"storage", b"\x00torage", 1))
    assert _error(path) == REFUSED.format("Only persistent_load of storage is allowed, but got <class 'str'>")


def test_a_truncated_legacy_checkpoint_names_the_exception_when_torch_says_nothing(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    path = tmp_path / "m.bin"
    path.write_bytes(data[:20])
    assert _error(path) == NOT_READABLE + "EOFError"
    path.write_bytes(data[:200])
    assert _error(path) == NOT_READABLE + "its pickle is malformed (IndexError: index out of range)"
    path.write_bytes(data[:-5])
    assert _error(path) == NOT_READABLE + "unexpected EOF, expected 5 more bytes. The file might be corrupted."


def test_a_length_past_the_end_of_a_legacy_pickle_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    """Only claims over 1 MiB that are longer than the rest of the file: the reader's own line; smaller ones reach EOF."""
    path = tmp_path / "m.pt"

    def claim(n: int, present: int) -> str:
        path.write_bytes(b"\x80\x02X" + struct.pack("<I", n) + b"x" * present)
        return _error(path)

    mib = 1 << 20
    assert claim(mib + 10, 2) == NOT_READABLE + f"a length in the pickle claims {mib + 10} bytes, but only 2 are left"
    assert claim(mib + 1, mib) == NOT_READABLE + f"a length in the pickle claims {mib + 1} bytes, but only {mib} are left"
    assert claim(mib, 10) == NOT_READABLE + "EOFError"  # 1 MiB is read (and found short) as any length
    assert claim(mib + 1, mib + 1) == NOT_READABLE + "EOFError"  # all there: read; then the pickle ends without STOP


def test_containers_that_loop_or_nest_too_deep_or_explode_are_refused_exactly(tmp_path: Path) -> None:
    loop: list[object] = []
    loop.append(loop)
    torch.save(loop, tmp_path / "loop.pt")
    assert _error(tmp_path / "loop.pt") == "the list at '0' contains itself; not a state dict"

    def nested(depth: int) -> object:
        obj: object = torch.ones(1)
        for _ in range(depth):
            obj = [obj]
        return obj

    torch.save(nested(100), tmp_path / "deep100.pt")
    assert list(TorchPickle(tmp_path / "deep100.pt").metas()) == [".".join(["0"] * 100)]
    torch.save(nested(101), tmp_path / "deep101.pt")
    at = ".".join(["0"] * 100)
    assert _error(tmp_path / "deep101.pt") == (
        f"containers nested more than 100 deep (at {at[:100]!r}... (199 characters)); not a state dict"
    )

    shared: list[object] = [torch.ones(1)]
    for _ in range(40):
        shared = [shared, shared]  # 2**40 paths through 42 objects, a few hundred bytes on disk
    torch.save(shared, tmp_path / "boom.pt")
    assert _error(tmp_path / "boom.pt") == (
        "its containers refer to the same containers over and over (10673+ paths through 42 objects); corrupt or malicious pickle"
    )


def test_long_keys_are_cut_in_messages_after_120_characters(tmp_path: Path) -> None:
    sparse = torch.eye(2).to_sparse()
    for length in (120, 121):
        key = "k" * length
        torch.save({key: sparse}, tmp_path / f"{length}.pt")
        shown = repr(key) if length == 120 else f"{key[:100]!r}... (121 characters)"
        assert _error(tmp_path / f"{length}.pt") == f"tensor {shown} is sparse (torch.sparse_coo); save tensor.to_dense() instead"
    torch.save(sparse, tmp_path / "root.pt")
    assert _error(tmp_path / "root.pt") == "tensor '<root>' is sparse (torch.sparse_coo); save tensor.to_dense() instead"
    torch.save({torch.ones(1)}, tmp_path / "set.pt")
    assert _error(tmp_path / "set.pt") == "the set at '<root>' holds tensors, which have no names in a set"
    torch.save({"s" * 125: {torch.ones(1)}}, tmp_path / "set2.pt")
    assert _error(tmp_path / "set2.pt") == f"the set at {'s' * 100!r}... (125 characters) holds tensors, which have no names in a set"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.ones(2)}}, tmp_path / "clash.pt")
    assert _error(tmp_path / "clash.pt") == (
        "two tensors flatten to the same key 'a.b' (as 'a.b' and 'b' inside 'a' would); which is meant?"
    )


def test_what_holds_no_tensor_is_listed_once_at_its_largest(tmp_path: Path) -> None:
    one = torch.ones(1)
    torch.save([one, 3, {"x": one * 2, "y": "s", "z": {"deep": [1, 2]}}, (4,), {5}], tmp_path / "list.pt")
    source = TorchPickle(tmp_path / "list.pt")
    assert list(source.metas()) == ["0", "2.x"]
    assert source.skipped == ["1", "2.y", "2.z", "3", "4"]
    assert torch.equal(source.load("2.x"), one * 2)
    torch.save({"a": 1, "b": [2]}, tmp_path / "none.pt")
    assert TorchPickle(tmp_path / "none.pt").skipped == ["a", "b"]
    torch.save(3, tmp_path / "root.pt")
    assert TorchPickle(tmp_path / "root.pt").skipped == ["<root>"]
    torch.save({}, tmp_path / "empty.pt")
    empty = TorchPickle(tmp_path / "empty.pt")  # holds no tensor: the whole file is skipped
    assert empty.skipped == ["<root>"] and dict(empty.metas()) == {}


def test_zip_checkpoints_are_memory_mapped_and_legacy_ones_read_whole(tmp_path: Path) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.arange(4, dtype=torch.float16)}
    torch.save(state, tmp_path / "zip.pt")
    source = TorchPickle(tmp_path / "zip.pt")
    assert source.name == str(tmp_path / "zip.pt") and source.format == "torch"
    for key, value in state.items():
        loaded = source.load(key)
        assert loaded.device.type == "cpu" and torch.equal(loaded, value)
        assert mapped_file(loaded.data_ptr()) == str(tmp_path / "zip.pt")  # mapped, not read
    with pytest.raises(SourceError) as e:
        source.load("x")
    assert str(e.value) == f"{tmp_path / 'zip.pt'}: no tensor named 'x'"
    source.close()
    with pytest.raises(SourceError):
        source.load("w")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = TorchPickle(tmp_path / "legacy.pt")
    assert all(torch.equal(legacy.load(k), v) and mapped_file(legacy.load(k).data_ptr()) != str(tmp_path / "legacy.pt") for k, v in state.items())


def test_torchs_refusals_become_one_line() -> None:
    text = (
        "Weights only load failed. This file can still be loaded...\n"
        "Please file an issue with the following so that we can make `weights_only=True` compatible with your use case: "
        "WeightsUnpickler error: Unsupported global: GLOBAL evil.Thing was not an allowed global by default.\n\n"
        "Check the documentation of torch.load to learn more about types accepted by default with weights_only"
    )
    assert _unpickling_message(text) == REFUSED.format("it needs evil.Thing, which could run code")
    assert _unpickling_message("WeightsUnpickler error: Unsupported operand 149") == (
        "cannot unpickle safely: pickle opcode 149 (0x95) is not one torch.save writes (written by pickle.dump rather "
        "than torch.save, or corrupt?); statebridge never runs code from a checkpoint"
    )
    assert _unpickling_message("Weights only load failed.\nWeightsUnpickler error: \t bad thing  \nmore") == REFUSED.format("bad thing")
    assert _unpickling_message("Weights only load failed\n\n(1) retry\n  the real reason  \nlater") == REFUSED.format("the real reason")
    assert _unpickling_message("Please file an issue\nCheck the documentation") == REFUSED.format("it holds objects other than tensors")
    assert _unpickling_message("x" * 400) == REFUSED.format("x" * 300)


def test_first_sentence_of_long_lines_only() -> None:
    assert _first_sentence("") == "" and _first_sentence("  \n ") == ""
    assert _first_sentence("  short. Two sentences.  \nsecond line") == "short. Two sentences."
    long = "a" * 150 + ". " + "b" * 20
    assert _first_sentence(long) == "a" * 150
    exactly = "a" * 150 + ". bbbbbbbb"  # 160 characters: kept whole
    assert len(exactly) == 160 and _first_sentence(exactly) == exactly
    assert _first_sentence("c" * 200) == "c" * 200  # long, but no sentence to cut at


def test_the_walk_limit_counts_every_visit_from_the_root(tmp_path: Path) -> None:
    """One tensor listed n times: n + 1 visits through 2 objects, refused past 10,000 + 16 * 2."""
    t = torch.ones(1)
    torch.save([t] * 10_031, tmp_path / "ok.pt")  # 10,032 visits: at the limit
    assert len(TorchPickle(tmp_path / "ok.pt").metas()) == 10_031
    torch.save([t] * 10_032, tmp_path / "over.pt")
    assert _error(tmp_path / "over.pt") == (
        "its containers refer to the same containers over and over (10033+ paths through 2 objects); corrupt or malicious pickle"
    )


def test_a_bare_tensor_is_the_one_tensor_of_the_state_under_the_empty_name(tmp_path: Path) -> None:
    torch.save(torch.arange(3), tmp_path / "bare.pt")
    source = TorchPickle(tmp_path / "bare.pt")
    assert list(source.metas()) == [""] and source.skipped == []
    assert torch.equal(source.load(""), torch.arange(3))


def test_torchs_refusals_are_cut_at_300_characters_and_skip_its_numbered_advice() -> None:
    assert _unpickling_message("WeightsUnpickler error: " + "y" * 400) == REFUSED.format("y" * 300)
    assert _unpickling_message("Weights only load failed\n(2) try this\n  why  ") == REFUSED.format("why")


def test_a_line_of_161_characters_is_cut_at_its_first_sentence() -> None:
    line = "a" * 150 + ". " + "b" * 9
    assert len(line) == 161 and _first_sentence(line) == "a" * 150


def test_a_zip_end_record_spanning_disks_is_a_damaged_archive(tmp_path: Path) -> None:
    """``zipfile.is_zipfile`` raises (rather than answers) on a zip64 locator claiming two disks."""
    data = _saved({"w": torch.ones(3)})
    end = data.rfind(b"PK\x05\x06")
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)
    path = tmp_path / "m.pt"
    path.write_bytes(data[:end] + locator + data[end:])
    assert _error(path) == "zip archive is damaged (zipfiles that span multiple disks are not supported): corrupt torch checkpoint"


def test_torchs_unfilled_placeholders_are_cut_off(tmp_path: Path) -> None:
    """A legacy storage whose size field lies: torch says 'expected %ld got %ld<n>'; the line keeps what precedes it."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    at = data.rfind(struct.pack("<q", 3) + struct.pack("<3f", 1, 1, 1))
    path = tmp_path / "m.pt"
    path.write_bytes(data[:at] + struct.pack("<q", 4) + data[at + 8 :])
    assert _error(path) == NOT_READABLE + "storage has wrong byte size"


def test_a_long_malformed_pickle_message_is_cut_at_200_characters(tmp_path: Path) -> None:
    # a legacy checkpoint whose list of storage keys names one the file does not hold: torch's assertion repeats it
    buffer = io.BytesIO()
    torch.save({}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    no_keys = pickle.dumps([], protocol=2)
    assert data.endswith(no_keys)
    path = tmp_path / "m.pt"
    path.write_bytes(data[: -len(no_keys)] + pickle.dumps(["k" * 300], protocol=2))
    assert _error(path) == NOT_READABLE + "its pickle is malformed (AssertionError: storage key '" + "k" * 187 + ")"
