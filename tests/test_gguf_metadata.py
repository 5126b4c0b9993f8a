"""A config's ``metadata:`` sets and deletes output fields explicitly (issue 14): typed in GGUF, in the plan and the fingerprint.

Written fields are read back with gguf-py's own ``GGUFReader``: value and GGUF type.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGUFValueType as V
from safetensors import safe_open
from safetensors.torch import save_file

import statebridge as sb
from statebridge import ConfigError
from statebridge.readers.gguf import GGUFSource

sys.path.insert(0, str(Path(__file__).parent))
from test_nothing_lost_readers import _gguf_with_fields  # noqa: E402

EDITS = {
    "general.name": "edited",  # carried STRING
    "llama.context_length": 4096,  # carried UINT32: stays UINT32
    "llama.rope.freq_base": 5e5,  # carried FLOAT32
    "tokenizer.ggml.tokens": ["<s>", "</s>", "b"],  # carried ARRAY of STRING
    "custom.count": 7,  # new: INT32, as gguf's writer types a Python int
    "custom.big": 2**40,  # new: INT64
    "custom.ratio": 0.5,  # new: FLOAT32
    "custom.flag": True,  # new: BOOL
    "custom.ids": [1, 2, 3],  # new: ARRAY of INT32
    "custom.weights": [1, 2.5],  # new: ARRAY of FLOAT32
    "tokenizer.ggml.scores": None,  # deleted
}


def _read(path: Path) -> dict[str, tuple[list[V], object]]:
    """field -> (GGUF types, value), by gguf-py's reader."""
    reader = gguf.GGUFReader(path)
    return {name: (list(field.types), field.contents()) for name, field in reader.fields.items()}


def test_set_and_delete_read_back_by_gguf_with_their_types(tmp_path: Path) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    sb.run(source, None, tmp_path / "o.gguf", metadata=EDITS)
    fields = _read(tmp_path / "o.gguf")
    assert fields["general.name"] == ([V.STRING], "edited")
    assert fields["llama.context_length"] == ([V.UINT32], 4096)
    assert fields["llama.rope.freq_base"] == ([V.FLOAT32], 5e5)
    assert fields["tokenizer.ggml.tokens"] == ([V.ARRAY, V.STRING], ["<s>", "</s>", "b"])
    assert fields["custom.count"] == ([V.INT32], 7)
    assert fields["custom.big"] == ([V.INT64], 2**40)
    assert fields["custom.ratio"] == ([V.FLOAT32], 0.5)
    assert fields["custom.flag"] == ([V.BOOL], True)
    assert fields["custom.ids"] == ([V.ARRAY, V.INT32], [1, 2, 3])
    assert fields["custom.weights"] == ([V.ARRAY, V.FLOAT32], [1.0, 2.5])
    assert "tokenizer.ggml.scores" not in fields
    assert fields["llama.block_count"] == ([V.UINT32], 2)  # not named: carried as it was
    assert fields["general.architecture"] == ([V.STRING], "llama")


def test_the_plan_shows_the_edits_and_the_fingerprint_covers_them(tmp_path: Path) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    plan = sb.plan(source, None, metadata={"general.name": "x", "tokenizer.ggml.scores": None})
    line = "info (plan.metadata): metadata: sets general.name='x'; deletes tokenizer.ggml.scores"
    assert line in plan.render() and line in plan.to_dict()["findings"]
    plain = sb.plan(source, None).fingerprint
    assert not any(f.check == "plan.metadata" for f in sb.plan(source, None).findings)
    prints = {
        json.dumps(metadata): sb.plan(source, None, metadata=metadata).fingerprint
        for metadata in ({}, {"general.name": "x"}, {"general.name": "y"}, {"general.name": None}, {"general.name": 1})
    }
    assert prints[json.dumps({})] == plain and len(set(prints.values())) == 5
    assert sb.plan(source, None, metadata={"general.name": "x"}).fingerprint == prints[json.dumps({"general.name": "x"})]
    sb.run(source, None, tmp_path / "o.gguf", metadata={"general.name": "x"})
    assert GGUFSource(tmp_path / "o.gguf").fields["statebridge.fingerprint"] == prints[json.dumps({"general.name": "x"})]


def test_a_config_sets_and_deletes(tmp_path: Path) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"source: {source}\ntarget: {tmp_path / 'o.gguf'}\n"
        "metadata: {general.name: from-yaml, llama.context_length: 256, tokenizer.ggml.scores: null}\n"
    )
    from statebridge.cli import main

    assert main(["run", str(config), "--no-progress"]) == 0
    out = GGUFSource(tmp_path / "o.gguf").typed_fields
    assert (out["general.name"].value, out["llama.context_length"].value, out["llama.context_length"].type) == ("from-yaml", 256, V.UINT32)
    assert "tokenizer.ggml.scores" not in out


@pytest.mark.parametrize(
    "metadata, words",
    [
        ({"llama.context_length": "4096"}, "metadata 'llama.context_length': the source stores it as UINT32, and '4096' is a str; give a UINT32 value"),
        ({"llama.context_length": -1}, "metadata 'llama.context_length': -1 does not fit UINT32"),
        ({"llama.context_length": True}, "the source stores it as UINT32, and True is a bool"),
        ({"general.name": 3}, "the source stores it as STRING, and 3 is a int"),
        ({"tokenizer.ggml.tokens": "a"}, "the source stores it as ARRAY, and 'a' is a str; give a list"),
        ({"tokenizer.ggml.scores": ["x"]}, "the source stores it as ARRAY, and 'x' is a str; give a FLOAT32 value"),
        ({"custom.mixed": [1, "a"]}, "metadata 'custom.mixed': a list mixes kinds of values"),
        ({"custom.huge": 2**64}, "metadata 'custom.huge': 18446744073709551616 does not fit INT64"),
        ({"no.such.field": None}, "metadata 'no.such.field': cannot delete it: the source carries no such field into gguf"),
        ({"general.architecture": None}, "metadata 'general.architecture': cannot delete it: llama.cpp finds every other field"),
        ({"general.alignment": 48}, "metadata 'general.alignment': the alignment must be a power of two, not 48"),
        ({"custom.nested": {"a": 1}}, "metadata 'custom.nested': the value {'a': 1} is a dict"),
        ({"statebridge.fingerprint": "forged"}, "'statebridge.fingerprint' is reserved"),
    ],
)
def test_bad_edits_are_one_line_before_any_work(tmp_path: Path, metadata: dict, words: str) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    for dry in (True, False):
        with pytest.raises(ConfigError) as info:
            if dry:  # what a dry run or `statebridge plan` with a target does: plan, then meet the writer
                sb.api.target_writer(sb.plan(source, None, metadata=metadata), tmp_path / "o.gguf", metadata=metadata)
            else:
                sb.run(source, None, tmp_path / "o.gguf", metadata=metadata)
        assert words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.gguf").exists()


def test_alignment_and_architecture_may_be_set(tmp_path: Path) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    sb.run(source, None, tmp_path / "o.gguf", metadata={"general.alignment": 64, "general.architecture": "llama"})
    out = GGUFSource(tmp_path / "o.gguf")
    assert out.alignment == 64 and out.data_offset % 64 == 0
    assert _read(tmp_path / "o.gguf")["general.alignment"] == ([V.UINT32], 64)


# -- text formats: text only --------------------------------------------------------------------------


def _st(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_safetensors_sets_text_and_deletes_what_it_carries(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "s.safetensors", metadata={"format": "pt", "origin": "x", "license": "mit"})
    sb.run(tmp_path / "s.safetensors", None, tmp_path / "o.safetensors", metadata={"origin": None, "note": "y"})
    stored = _st(tmp_path / "o.safetensors")
    assert "origin" not in stored and stored["note"] == "y" and stored["license"] == "mit"


@pytest.mark.parametrize("target", ["o.safetensors", "o.pt"])
@pytest.mark.parametrize(
    "metadata, words",
    [
        ({"a": 1}, "metadata 'a': {format} stores metadata as text, and 1 is a int; quote it"),
        ({"a": ["x"]}, "metadata 'a': {format} stores metadata as text, and ['x'] is a list"),
        ({"origin": None}, "metadata 'origin': cannot delete it: the source carries no such field into {format}"),
    ],
)
def test_text_formats_refuse_typed_values_in_one_line(tmp_path: Path, target: str, metadata: dict, words: str) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "s.safetensors")
    with pytest.raises(ConfigError) as info:
        sb.run(tmp_path / "s.safetensors", None, tmp_path / target, metadata=metadata)
    fmt = "safetensors" if target.endswith(".safetensors") else "torch"
    assert words.format(format=fmt) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / target).exists()


# -- the real Gemma 3 270M Q4_K_M ----------------------------------------------------------------------

GEMMA_EDITS = {"general.name": "Gemma edited", "gemma3.context_length": 8192, "general.license": None, "general.tags": None}


@pytest.fixture(scope="module")
def edited(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("edited") / "gemma-edited.gguf"
    sb.run(gemma_path, None, target, metadata=GEMMA_EDITS, progress=False, durable=False)
    return target


def test_gemma_edits_keep_every_other_field(gemma_path: Path, edited: Path) -> None:
    source, out = GGUFSource(gemma_path).typed_fields, GGUFSource(edited).typed_fields
    assert out["general.name"].value == "Gemma edited" and out["gemma3.context_length"].type == V.UINT32
    assert "general.license" not in out and "general.tags" not in out
    for key, field in source.items():
        if key not in GEMMA_EDITS:
            assert out[key] == field, key


@pytest.mark.slow  # gguf.GGUFReader takes about half a minute over Gemma's 262k-token vocabulary
def test_gemma_edits_read_back_by_gguf(edited: Path) -> None:
    fields = _read(edited)
    assert fields["general.name"] == ([V.STRING], "Gemma edited")
    assert fields["gemma3.context_length"] == ([V.UINT32], 8192)
    assert "general.license" not in fields and "general.tags" not in fields
    assert fields["gemma3.embedding_length"] == ([V.UINT32], 640)


def test_the_order_of_metadata_changes_neither_bytes_nor_fingerprint(tmp_path: Path) -> None:
    source = _gguf_with_fields(tmp_path / "s.gguf")
    forward = {"custom.a": 1, "custom.b": "x", "general.name": "n"}
    backward = dict(reversed(list(forward.items())))
    sb.run(source, None, tmp_path / "f.gguf", metadata=forward)
    sb.run(source, None, tmp_path / "b.gguf", metadata=backward)
    assert (tmp_path / "f.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    save_file({"w": torch.ones(2)}, tmp_path / "s.safetensors")
    text = {"b": "1", "a": "2"}
    sb.run(tmp_path / "s.safetensors", None, tmp_path / "f.safetensors", metadata=text)
    sb.run(tmp_path / "s.safetensors", None, tmp_path / "b.safetensors", metadata=dict(reversed(list(text.items()))))
    assert (tmp_path / "f.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sb.plan(source, None, metadata=forward).fingerprint == sb.plan(source, None, metadata=backward).fingerprint
