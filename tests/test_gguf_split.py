"""Split GGUF (llama.cpp's ``NAME-00001-of-0000N.gguf`` parts): read as one source, written with
``shard_size`` into a folder, checked against llama.cpp's own Python writer and reader (``gguf``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType

import statebridge as sb
from statebridge.errors import SourceError
from statebridge.readers import open_source
from statebridge.readers.gguf import GGUFSource, open_gguf
from statebridge.tensors.provenance import FINGERPRINT_KEY, is_reserved

sys.path.insert(0, str(Path(__file__).parent))
from test_torch_free import run_cli  # noqa: E402

SPLIT_KEYS = {"split.no", "split.count", "split.tensors.count"}


def _tensors(seed: int, layers: int = 4) -> list[tuple[str, np.ndarray, Q | None]]:
    """Q8_0, Q4_0, F16 and F32 tensors of 8 to 10 KB each (gguf quantizes the first two itself)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray, Q | None]] = [("token_embd.weight", rng.standard_normal((64, 64)).astype(np.float16), None)]
    for i in range(layers):
        out.append((f"blk.{i}.attn_q.weight", gguf.quants.quantize(rng.standard_normal((128, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0))
        out.append((f"blk.{i}.ffn_up.weight", gguf.quants.quantize(rng.standard_normal((256, 64)).astype(np.float32), Q.Q4_0), Q.Q4_0))
        out.append((f"blk.{i}.attn_norm.weight", rng.standard_normal(64).astype(np.float32), None))
    return out


def _write_reference(path: Path, seed: int = 0, layers: int = 4, **split) -> Path:
    """A model written by llama.cpp's own Python writer; ``split_max_size=`` makes it a split GGUF as gguf-split does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama", **split)
    writer.add_uint32("llama.block_count", layers)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "héllo", "▁world"] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0] * 50)
    writer.add_string("general.name", f"tiny-{seed}")
    for name, array, raw_dtype in _tensors(seed, layers):
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _stored(source: GGUFSource) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (GGML type, shape, stored bytes), read from whichever file holds each tensor."""
    out = {}
    for key in source.metas():
        span = source.stored_span(key)
        with open(span.path, "rb") as f:
            f.seek(span.offset)
            out[key] = (source.gguf_types[key], source.metas()[key].shape, f.read(span.length))
    return out


@pytest.fixture
def single(tmp_path: Path) -> Path:
    return _write_reference(tmp_path / "single" / "tiny.gguf")


def _split_run(source: Path, target: Path, shard_size: int = 20_000, **options) -> sb.api.RunReport:
    steps = [sb.Rename(mapping={"blk.0.attn_q.weight": "blk.0.attn_q_renamed.weight"})]
    return sb.run(source, steps, target, format="gguf", shard_size=shard_size, progress=False, durable=False, **options)


def test_split_round_trip_keeps_every_tensor_byte_type_and_field(single: Path, tmp_path: Path) -> None:
    target = tmp_path / "split"
    report = _split_run(single, target)
    names = sorted(p.name for p in target.iterdir())
    count = len(names)
    assert count >= 3 and names == [f"model-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert report.files == [target / name for name in names]

    source, out = GGUFSource(single), open_source(target)
    assert isinstance(out, GGUFSource) and out.parts == [target / name for name in names]
    after = _stored(out)
    before = {k.replace("attn_q.", "attn_q_renamed.") if k.startswith("blk.0.") else k: v for k, v in _stored(source).items()}
    assert after == before  # bytes, types and shapes
    assert list(after) == list(before)  # and order
    for key, field in source.typed_fields.items():
        assert out.typed_fields[key] == field, key
    assert {k for k in out.typed_fields if k not in source.typed_fields and not is_reserved(k)} == SPLIT_KEYS

    # each part is a valid GGUF for llama.cpp's reader, laid out as gguf-split lays them out
    seen = []
    for index, name in enumerate(names):
        reader = gguf.GGUFReader(target / name)
        fields = {f.name: f.contents() for f in reader.fields.values()}
        assert (fields["split.no"], fields["split.count"], fields["split.tensors.count"]) == (index, count, len(before))
        assert reader.fields["split.no"].types == [GGUFValueType.UINT16]
        assert reader.fields["split.count"].types == [GGUFValueType.UINT16]
        assert reader.fields["split.tensors.count"].types == [GGUFValueType.INT32]
        assert ("llama.block_count" in fields) == (index == 0)  # the model's key-values in the first part only
        assert fields[FINGERPRINT_KEY] == out.fields[FINGERPRINT_KEY]  # a later run knows every part as its own
        for t in reader.tensors:
            seen.append(t.name)
            assert bytes(t.data.tobytes()) == after[t.name][2]  # tensors are never cut across parts
        if index < count - 1:  # a part is closed when the next tensor would take it past shard_size
            data = sum(-(-t.n_bytes // 32) * 32 for t in reader.tensors)
            assert data <= 20_000 or len(reader.tensors) == 1
    assert seen == list(after)


def test_split_gguf_written_by_llama_cpp_reads_as_one_source(single: Path, tmp_path: Path) -> None:
    split = _write_reference(tmp_path / "ref" / "tiny.gguf", split_max_size=20_000)
    parts = sorted((tmp_path / "ref").iterdir())
    assert len(parts) >= 3 and parts[0].name == f"tiny-00001-of-{len(parts):05d}.gguf"
    assert not split.exists()
    whole = open_source(parts[0])
    assert _stored(whole) == _stored(GGUFSource(single))
    assert whole.files() == parts
    assert open_source(tmp_path / "ref").parts == parts  # the folder holding just the parts, too
    assert whole.fields["general.name"] == "tiny-0" and whole.fields["split.count"] == len(parts)

    # into one file: the split keys describe the source's files, not the model, and are not carried
    target = tmp_path / "merged.gguf"
    sb.run(parts[0], None, target, progress=False, durable=False)
    merged = GGUFSource(target)
    assert _stored(merged) == _stored(GGUFSource(single))
    assert not SPLIT_KEYS & set(merged.typed_fields)
    for key, field in GGUFSource(single).typed_fields.items():
        assert merged.typed_fields[key] == field, key


def test_missing_part_is_one_line_naming_it(single: Path, tmp_path: Path) -> None:
    target = tmp_path / "split"
    _split_run(single, target)
    parts = sorted(target.iterdir())
    parts[1].unlink()
    with pytest.raises(SourceError, match=rf"{parts[1]}: is missing: it is part 2 of the {len(parts)}-part split GGUF"):
        open_source(parts[0])
    done = subprocess.run([sys.executable, "-m", "statebridge", "inspect", str(parts[0])], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"statebridge: error: {parts[1]}: is missing: it is part 2 of the {len(parts)}-part split GGUF {parts[0].name}"]


def test_part_of_another_model_is_refused(tmp_path: Path) -> None:
    # gguf-split's parts carry no model identity: another model's part shows in the tensor count
    a = _write_reference(tmp_path / "a" / "m.gguf", seed=0, layers=4, split_max_tensors=4)  # 13 tensors in 4 parts
    b = _write_reference(tmp_path / "b" / "m.gguf", seed=1, layers=5, split_max_tensors=5)  # 16 in 4 parts
    a_parts, b_parts = sorted(a.parent.iterdir()), sorted(b.parent.iterdir())
    assert len(a_parts) == len(b_parts)
    shutil.copyfile(b_parts[1], a_parts[1])
    with pytest.raises(SourceError, match=r"m-00002-of-\d{5}\.gguf: is not part 2 of \d+ of m-00001-of-\d{5}\.gguf: its split keys say part 2 of 4, 16 tensors in all where part 2 of 4, 13 tensors in all was expected"):
        open_source(a_parts[0])

    # statebridge's own parts carry the run's fingerprint: another run's part is told apart by it
    first, second = tmp_path / "first", tmp_path / "second"
    _split_run(b_parts[0], first)
    steps = [sb.Rename(mapping={"blk.1.attn_q.weight": "other.weight"})]
    sb.run(b_parts[0], steps, second, format="gguf", shard_size=20_000, progress=False, durable=False)
    ours, theirs = sorted(first.iterdir()), sorted(second.iterdir())
    assert [p.name for p in ours] == [p.name for p in theirs]
    shutil.copyfile(theirs[-1], ours[-1])
    with pytest.raises(SourceError, match=rf"{ours[-1]}: belongs to another model than {ours[0].name}: its statebridge.fingerprint differs"):
        open_source(first)


def test_later_part_or_renamed_first_part_refused(single: Path, tmp_path: Path) -> None:
    target = tmp_path / "split"
    _split_run(single, target)
    parts = sorted(target.iterdir())
    with pytest.raises(SourceError, match=rf"is part 2 of {len(parts)} of a split GGUF.*open its first part, {parts[0].name}"):
        open_source(parts[1])
    renamed = tmp_path / "renamed.gguf"
    shutil.copyfile(parts[0], renamed)
    with pytest.raises(SourceError, match=rf"{renamed}: is part 1 of a {len(parts)}-part split GGUF, but its name does not end in '-00001-of-"):
        open_gguf(renamed)
    # a single part, opened as a file by itself, is just that file (the target policy reads parts so)
    assert len(GGUFSource(parts[1]).metas()) < len(open_source(parts[0]).metas())


def test_shard_size_with_a_gguf_file_target_writes_one_file(single: Path, tmp_path: Path) -> None:
    """As with ``.safetensors``, shard_size cuts folder targets; a file target is the one file it names."""
    report = sb.run(single, None, tmp_path / "out.gguf", shard_size=20_000, progress=False, durable=False)
    assert report.files == [tmp_path / "out.gguf"] and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "single"]
    out = open_source(tmp_path / "out.gguf")
    assert out.parts == [tmp_path / "out.gguf"] and not SPLIT_KEYS & set(out.typed_fields)
    assert _stored(out) == _stored(GGUFSource(single))


def test_split_output_is_deterministic_and_replaces_its_own_folder(single: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _split_run(single, a)
    _split_run(single, b)
    assert [p.read_bytes() for p in sorted(a.iterdir())] == [p.read_bytes() for p in sorted(b.iterdir())]
    # a second run into the same folder knows every part as statebridge's own (each carries the fingerprint)
    report = _split_run(single, a, shard_size=10**9)
    assert report.replaced and "statebridge wrote" in report.replaced
    assert [p.name for p in a.iterdir()] == ["model-00001-of-00001.gguf"]
    assert _stored(open_source(a)) == _stored(open_source(b))


def test_split_rename_imports_no_torch(single: Path, tmp_path: Path) -> None:
    config = tmp_path / "split.yaml"
    config.write_text(
        f"source: {single}\ntarget: {tmp_path / 'out'}\nformat: gguf\nshard_size: 20000\nsteps:\n"
        "  - rename: {pattern: 'blk.*.attn_norm.weight', to: 'blk.*.norm.weight'}\n"
    )
    modules, _ = run_cli("run", str(config), "--no-progress")
    assert "torch" not in modules
    out = open_source(tmp_path / "out")
    assert len(out.parts) >= 3 and "blk.3.norm.weight" in out.metas()
    assert sum(qtype == "Q8_0" for qtype in out.gguf_types.values()) == 4


def test_every_part_keeps_a_custom_alignment(single: Path, tmp_path: Path) -> None:
    """Readers assume 32 in a part without general.alignment: each part must say it."""
    target = tmp_path / "split"
    _split_run(single, target, metadata={"general.alignment": 64})
    parts = sorted(target.iterdir())
    assert len(parts) >= 3
    for part in parts:
        reader = gguf.GGUFReader(part)
        assert reader.fields["general.alignment"].contents() == 64
        assert all(t.data_offset % 64 == 0 for t in reader.tensors)
        assert len([f for f in reader.fields.values() if f.name.startswith("split.")]) == 3  # no key twice
    assert _stored(open_source(target)) == {
        k.replace("attn_q.", "attn_q_renamed.") if k.startswith("blk.0.") else k: v for k, v in _stored(GGUFSource(single)).items()
    }
