"""``metadata:`` edits on each writer: the exact field each edit leaves (value, GGUF type, element type) and the exact refusal.

Written against the mutants of ``writers/metadata.py`` that the suite let live (docs/testing.md):
the older tests look for part of each message and at most types; these compare
whole lines and whole typed fields, at the edges of every integer type, on the
writers themselves (a GGUF writer that carried a real GGUF file's fields).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGUFValueType as V
from safetensors.torch import save_file

from statebridge import ConfigError
from statebridge.readers import open_source
from statebridge.readers.gguf import GGUFField, GGUFSource
from statebridge.writers.gguf import GGUFWriter
from statebridge.writers.metadata import _INTEGERS, _infer, edit_metadata, gguf_field
from statebridge.writers.safetensors import SafetensorsWriter
from statebridge.writers.torch_file import TorchWriter

sys.path.insert(0, str(Path(__file__).parent))
from test_nothing_lost_readers import _gguf_with_fields  # noqa: E402


def _message(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as e:
        call()
    return str(e.value)


@pytest.fixture
def carrying(tmp_path: Path) -> GGUFWriter:
    """A GGUF writer that carried the fields of a real GGUF file (general.name STRING, llama.context_length UINT32, ...)."""
    writer = GGUFWriter(tmp_path / "o.gguf")
    writer.carry(GGUFSource(_gguf_with_fields(tmp_path / "s.gguf")))
    return writer


def _typed(field: GGUFField) -> tuple[object, V, V | None]:
    return field.value, field.type, field.sub_type


def test_new_fields_get_the_type_gguf_gives_the_python_value() -> None:
    assert _typed(gguf_field("k", "x", None)) == ("x", V.STRING, None)
    assert _typed(gguf_field("k", True, None)) == (True, V.BOOL, None)
    assert _typed(gguf_field("k", False, None)) == (False, V.BOOL, None)
    assert _typed(gguf_field("k", 2**31 - 1, None)) == (2**31 - 1, V.INT32, None)
    assert _typed(gguf_field("k", -(2**31), None)) == (-(2**31), V.INT32, None)
    assert _typed(gguf_field("k", 2**31, None)) == (2**31, V.INT64, None)
    assert _typed(gguf_field("k", -(2**31) - 1, None)) == (-(2**31) - 1, V.INT64, None)
    assert _typed(gguf_field("k", 0.5, None)) == (0.5, V.FLOAT32, None)
    assert _typed(gguf_field("k", ["a", "b"], None)) == (["a", "b"], V.ARRAY, V.STRING)
    assert _typed(gguf_field("k", [True, False], None)) == ([True, False], V.ARRAY, V.BOOL)
    assert _typed(gguf_field("k", [1, 2], None)) == ([1, 2], V.ARRAY, V.INT32)
    assert _typed(gguf_field("k", [1, 2**31], None)) == ([1, 2**31], V.ARRAY, V.INT64)
    field = gguf_field("k", [1, 2.5], None)
    assert _typed(field) == ([1.0, 2.5], V.ARRAY, V.FLOAT32) and [type(v) for v in field.value] == [float, float]
    assert type(gguf_field("k", 0.5, None).value) is float


def test_a_list_of_mixed_kinds_is_refused_in_one_line() -> None:
    assert _message(lambda: _infer("custom.m", [1, "a"])) == (
        "metadata 'custom.m': a list mixes kinds of values ([1, 'a']); give items of one kind"
    )
    assert _message(lambda: _infer("custom.m", [True, 1])) == (
        "metadata 'custom.m': a list mixes kinds of values ([True, 1]); give items of one kind"
    )
    assert _message(lambda: _infer("custom.m", [True, 1.5])) == (
        "metadata 'custom.m': a list mixes kinds of values ([True, 1.5]); give items of one kind"
    )


@pytest.mark.parametrize("name", list(_INTEGERS))
def test_each_integer_type_takes_exactly_its_range(name: str) -> None:
    low, high = _INTEGERS[name]
    carried = GGUFField(0, V[name])
    for value in (low, high - 1):
        field = gguf_field("k", value, carried)
        assert _typed(field) == (value, V[name], None) and type(field.value) is int
    for value in (low - 1, high):
        assert _message(lambda: gguf_field("k", value, carried)) == f"metadata 'k': {value} does not fit {name} (from {low} to {high - 1})"
    assert _message(lambda: gguf_field("k", True, carried)) == (
        f"metadata 'k': the source stores it as {name}, and True is a bool; give a {name} value"
    )
    assert _message(lambda: gguf_field("k", 1.0, carried)) == (
        f"metadata 'k': the source stores it as {name}, and 1.0 is a float; give a {name} value"
    )


def test_the_integer_ranges_are_the_types_own() -> None:
    assert _INTEGERS == {
        "UINT8": (0, 256), "INT8": (-128, 128), "UINT16": (0, 65536), "INT16": (-32768, 32768),
        "UINT32": (0, 2**32), "INT32": (-(2**31), 2**31), "UINT64": (0, 2**64), "INT64": (-(2**63), 2**63),
    }


@pytest.mark.parametrize("name", ["FLOAT32", "FLOAT64"])
def test_float_fields_take_numbers_but_not_booleans_or_text(name: str) -> None:
    carried = GGUFField(0.0, V[name])
    field = gguf_field("k", 3, carried)
    assert _typed(field) == (3.0, V[name], None) and type(field.value) is float
    assert _typed(gguf_field("k", 0.25, carried)) == (0.25, V[name], None)
    assert _message(lambda: gguf_field("k", False, carried)) == (
        f"metadata 'k': the source stores it as {name}, and False is a bool; give a {name} value"
    )
    assert _message(lambda: gguf_field("k", "1", carried)) == (
        f"metadata 'k': the source stores it as {name}, and '1' is a str; give a {name} value"
    )


def test_strings_and_booleans_take_only_their_own_kind() -> None:
    assert _typed(gguf_field("k", "x", GGUFField("y", V.STRING))) == ("x", V.STRING, None)
    assert _typed(gguf_field("k", False, GGUFField(True, V.BOOL))) == (False, V.BOOL, None)
    assert _message(lambda: gguf_field("k", 1, GGUFField("y", V.STRING))) == (
        "metadata 'k': the source stores it as STRING, and 1 is a int; give a STRING value"
    )
    assert _message(lambda: gguf_field("k", 1, GGUFField(True, V.BOOL))) == (
        "metadata 'k': the source stores it as BOOL, and 1 is a int; give a BOOL value"
    )
    assert _message(lambda: gguf_field("k", "true", GGUFField(True, V.BOOL))) == (
        "metadata 'k': the source stores it as BOOL, and 'true' is a str; give a BOOL value"
    )


def test_carried_arrays_keep_their_element_type_and_refuse_what_does_not_fit() -> None:
    scores = GGUFField([0.5], V.ARRAY, V.FLOAT32)
    field = gguf_field("k", [1, 2.5], scores)
    assert _typed(field) == ([1.0, 2.5], V.ARRAY, V.FLOAT32)
    ids = GGUFField([1], V.ARRAY, V.UINT8)
    assert _typed(gguf_field("k", [0, 255], ids)) == ([0, 255], V.ARRAY, V.UINT8)
    assert _message(lambda: gguf_field("k", [0, 256], ids)) == "metadata 'k': 256 does not fit UINT8 (from 0 to 255)"
    assert _message(lambda: gguf_field("k", 3, ids)) == "metadata 'k': the source stores it as ARRAY, and 3 is a int; give a list"
    assert _message(lambda: gguf_field("k", ["x"], scores)) == (
        "metadata 'k': the source stores it as ARRAY, and 'x' is a str; give a FLOAT32 value"
    )
    nested = GGUFField([[1]], V.ARRAY, V.ARRAY)
    assert _message(lambda: gguf_field("k", [[1]], nested)) == (
        "metadata 'k': the source stores it as a nested array, which a config cannot set"
    )
    untyped = GGUFField([], V.ARRAY, None)
    assert _message(lambda: gguf_field("k", [1], untyped)) == (
        "metadata 'k': the source stores it as a nested array, which a config cannot set"
    )
    # a list where the source stores a scalar
    assert _message(lambda: gguf_field("k", [1], GGUFField(1, V.UINT32))) == (
        "metadata 'k': the source stores it as UINT32, and [1] is a list; give a UINT32 value"
    )


def test_gguf_edits_on_a_writer_that_carried_a_file(carrying: GGUFWriter) -> None:
    assert carrying.carried["llama.context_length"].type == V.UINT32
    carrying.metadata["note"] = "from a string option"
    edit_metadata(
        carrying,
        {"llama.context_length": 4096, "custom.z": 1, "custom.a": "x", "tokenizer.ggml.scores": None, "note": None},
    )
    assert {k: _typed(v) for k, v in carrying.fields.items()} == {
        "custom.a": ("x", V.STRING, None),
        "custom.z": (1, V.INT32, None),
        "llama.context_length": (4096, V.UINT32, None),
    }
    assert list(carrying.fields) == ["custom.a", "custom.z", "llama.context_length"]  # key order
    assert "tokenizer.ggml.scores" not in carrying.carried
    assert "note" not in carrying.metadata
    assert "general.name" in carrying.carried  # not named: left alone


def test_a_gguf_deletion_removes_a_set_field_too_and_only_what_is_carried(carrying: GGUFWriter) -> None:
    carrying.fields["general.name"] = GGUFField("set earlier", V.STRING)
    carrying.metadata["general.name"] = "a string option"
    edit_metadata(carrying, {"general.name": None})
    assert "general.name" not in carrying.carried and "general.name" not in carrying.fields
    assert "general.name" not in carrying.metadata
    # a field only set (fields=), never carried nor a string option: not the source's to delete
    carrying.fields["custom.only_set"] = 1
    assert _message(lambda: edit_metadata(carrying, {"custom.only_set": None})) == (
        "metadata 'custom.only_set': cannot delete it: the source carries no such field into gguf"
    )
    assert _message(lambda: edit_metadata(carrying, {"general.architecture": None})) == (
        "metadata 'general.architecture': cannot delete it: llama.cpp finds every other field by the architecture; set it instead"
    )


def test_the_alignment_must_be_a_power_of_two(carrying: GGUFWriter) -> None:
    for good in (1, 2, 64, 2**31):
        edit_metadata(carrying, {"general.alignment": good})
        assert _typed(carrying.fields["general.alignment"]) == (good, V.INT32 if good < 2**31 else V.INT64, None)
    for bad in (0, -4, 3, 48, 2**31 - 1):
        assert _message(lambda: edit_metadata(carrying, {"general.alignment": bad})) == (
            f"metadata 'general.alignment': the alignment must be a power of two, not {bad!r}"
        )
    for bad in (True, 64.0, "64"):
        assert _message(lambda: edit_metadata(carrying, {"general.alignment": bad})) == (
            f"metadata 'general.alignment': the alignment must be a power of two, not {bad!r}"
        )


def test_a_written_gguf_holds_the_edited_fields_with_their_types(carrying: GGUFWriter, tmp_path: Path) -> None:
    edit_metadata(carrying, {"llama.context_length": 256, "custom.ids": [1, 2], "general.name": None})
    carrying.begin({"w": open_source({"w": torch.ones(2)}).metas()["w"]})
    carrying.write("w", torch.ones(2))
    carrying.finish()
    fields = gguf.GGUFReader(tmp_path / "o.gguf").fields
    assert list(fields["llama.context_length"].types) == [V.UINT32] and fields["llama.context_length"].contents() == 256
    assert list(fields["custom.ids"].types) == [V.ARRAY, V.INT32] and fields["custom.ids"].contents() == [1, 2]
    assert "general.name" not in fields


@pytest.mark.parametrize("writer_type, fmt", [(SafetensorsWriter, "safetensors"), (TorchWriter, "torch")])
def test_text_formats_set_text_delete_what_they_carry_and_refuse_the_rest(tmp_path: Path, writer_type, fmt: str) -> None:  # type: ignore[no-untyped-def]
    save_file({"w": torch.ones(2)}, tmp_path / "s.safetensors", metadata={"origin": "x", "license": "mit"})
    writer = writer_type(tmp_path / ("o.safetensors" if fmt == "safetensors" else "o.pt"), metadata={"mine": "1"})
    writer.carry(open_source(tmp_path / "s.safetensors"))
    carried = dict(writer.metadata)
    edit_metadata(writer, {"note": "y", "origin": None} if fmt == "safetensors" else {"note": "y", "mine": None})
    expected = {**carried, "note": "y"}
    expected.pop("origin" if fmt == "safetensors" else "mine")
    assert writer.metadata == expected
    assert _message(lambda: edit_metadata(writer, {"n": 1})) == (
        f"metadata 'n': {fmt} stores metadata as text, and 1 is a int; quote it to store it as text"
    )
    assert _message(lambda: edit_metadata(writer, {"n": True})) == (
        f"metadata 'n': {fmt} stores metadata as text, and True is a bool; quote it to store it as text"
    )
    assert _message(lambda: edit_metadata(writer, {"gone": None})) == (
        f"metadata 'gone': cannot delete it: the source carries no such field into {fmt}"
    )
    edit_metadata(writer, None)
    assert writer.metadata == expected
