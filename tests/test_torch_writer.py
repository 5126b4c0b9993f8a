"""The streaming torch writer: files ``torch.load(weights_only=True)`` reads, bit-exact, deterministic,
and written one tensor at a time."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from statebridge.errors import ExecutionError
from statebridge.readers import open_source
from statebridge.tensors.meta import TensorMeta
from statebridge.writers.torch_file import TorchWriter


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.tensor([1.0, float("nan"), float("-inf"), -0.0]),
        "position_ids": torch.arange(10).unsqueeze(0),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "counts": torch.arange(5, dtype=torch.int32),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),  # pickled by torch via _rebuild_tensor_v3
        "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "complex": torch.randn(3, dtype=torch.complex64, generator=g),
        "double": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "empty": torch.zeros(0, 7),
        "scalar": torch.tensor(3.25),
        "transposed": torch.randn(5, 3, generator=g).t(),  # non-contiguous input
        "sliced": torch.randn(10, generator=g)[3:7],  # a view with a storage offset
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write(path: Path, state: dict[str, torch.Tensor], order: list[str] | None = None) -> list[Path]:
    writer = TorchWriter(path)
    writer.begin({k: TensorMeta.of(v) for k, v in state.items()})
    for key in order or list(state):
        writer.write(key, state[key])
    return writer.finish()


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_with_torch_load(tmp_path: Path, mmap: bool) -> None:
    state = _state()
    path = tmp_path / "model.pt"
    assert _write(path, state, order=list(reversed(state))) == [path]
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert type(loaded) is dict and list(loaded) == list(state)
    for key, value in state.items():
        out = loaded[key]
        assert out.dtype == value.dtype and out.shape == value.shape, key
        assert _bits(out) == _bits(value), key
    # the reader statebridge uses for torch files agrees
    with open_source(path) as source:
        assert {k: m for k, m in source.metas().items()} == {k: TensorMeta.of(v) for k, v in state.items()}


def test_pickle_matches_torch_save(tmp_path: Path) -> None:
    state = {k: v.contiguous().clone() for k, v in _state().items()}
    path = tmp_path / "model.bin"
    _write(path, state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    ours, theirs = zipfile.ZipFile(path), zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    assert ours.read("archive/data.pkl") == theirs.read("archive/data.pkl")
    assert sorted(ours.namelist()) == sorted(theirs.namelist())
    for name in theirs.namelist():
        if name != "archive/.data/serialization_id":  # derived from the record order
            assert ours.read(name) == theirs.read(name), name


def test_deterministic_bytes(tmp_path: Path) -> None:
    state = _state()
    a, b = tmp_path / "a.pt", tmp_path / "staging-1234.pt.tmp"
    _write(a, state)
    _write(b, state)
    assert a.read_bytes() == b.read_bytes()  # independent of the (staging) file name, too
    for info in zipfile.ZipFile(a).infolist():
        assert info.date_time == (1980, 0, 0, 0, 0, 0), info.filename  # no timestamps
        assert info.filename.startswith("archive/")


def test_for_target() -> None:
    for name in ("m.pt", "m.pth", "pytorch_model.bin", "M.PT"):
        assert TorchWriter.for_target(Path(name)), name
    for name in ("m.safetensors", "m.gguf", "m.ckpt", "m"):
        assert not TorchWriter.for_target(Path(name)), name


def test_contract_errors(tmp_path: Path) -> None:
    writer = TorchWriter(tmp_path / "x.pt")
    with pytest.raises(ExecutionError, match="before begin"):
        writer.write("a", torch.ones(2))
    writer.begin({"a": TensorMeta((2,), torch.float32), "b": TensorMeta((3,), torch.int64)})
    with pytest.raises(ExecutionError, match="not announced"):
        writer.write("c", torch.ones(2))
    with pytest.raises(ExecutionError, match="announced int64"):
        writer.write("b", torch.ones(3))
    writer.write("a", torch.ones(2))
    with pytest.raises(ExecutionError, match="twice"):
        writer.write("a", torch.ones(2))
    with pytest.raises(ExecutionError, match="never written.*'b'"):
        writer.finish()
    writer.abort()
    writer.abort()  # idempotent


def test_empty_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    _write(path, {})
    assert torch.load(path, weights_only=True) == {}


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import torch
    from statebridge.tensors.meta import TensorMeta
    from statebridge.writers.torch_file import TorchWriter

    n, rows = 8, 16 * 1024  # 8 tensors of 16384 x 1024 float32 = 64 MiB each
    writer = TorchWriter(Path(sys.argv[1]))
    writer.begin({f"t{i}": TensorMeta((rows, 1024), torch.float32) for i in range(n)})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(n):
        tensor = torch.full((rows, 1024), float(i))  # made, written and dropped: one alive at a time
        writer.write(f"t{i}", tensor)
        del tensor
    writer.finish()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak}))
    """
)


def test_peak_memory_stays_at_one_tensor(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "core"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    grown_mib = (usage["peak_kib"] - usage["base_kib"]) / 1024  # ru_maxrss is in KiB on Linux
    total_mib = 8 * 64
    assert grown_mib < 250, f"peak RSS grew by {grown_mib:.0f} MiB while writing {total_mib} MiB"
    assert path.stat().st_size > total_mib * 1024 * 1024
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert [loaded[f"t{i}"][-1, -1].item() for i in range(8)] == [float(i) for i in range(8)]
