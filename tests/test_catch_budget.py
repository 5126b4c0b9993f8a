"""The memory budget and the worker threads (docs/scale.md, "Memory" and "Threads").

Every budget here binds: groups are sized so that the budget admits exactly one, two or three
of them, and the tests assert the exact number of bytes in flight, not only an upper bound a
run would meet anyway.  ``default_budget`` is checked against the memory it is given, not
against its own floor.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file

import statebridge as sb
import statebridge.execute.executor as execute_module
from statebridge.execute.executor import MIN_DEFAULT_BUDGET, default_budget
from statebridge.writers.safetensors import SafetensorsWriter

GROUPS = 6
NUMEL = 1000
#: one group of the cast below holds its float32 input and its float16 output
GROUP = NUMEL * 4 + NUMEL * 2
CAST = [sb.Cast(dtype="fp16")]


def state() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((NUMEL,), i + 0.5) for i in range(GROUPS)}


class Recording(sb.DictSource):
    """A dict source that logs every load (from whichever thread) into a shared event list."""

    def __init__(self, tensors, events: list[tuple[str, str]]) -> None:
        super().__init__(tensors)
        self.events = events

    def load(self, key: str) -> torch.Tensor:
        self.events.append(("load", key))
        return super().load(key)


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """Loads and writes in the order they happened; writes also check they run on the calling thread."""
    log: list[tuple[str, str]] = []
    real_write, real_raw = SafetensorsWriter.write, SafetensorsWriter.write_raw

    def write(self, key, tensor):
        assert threading.current_thread() is threading.main_thread(), "a writer was called from a worker thread"
        log.append(("write", key))
        return real_write(self, key, tensor)

    def write_raw(self, key, spans):
        assert threading.current_thread() is threading.main_thread(), "a writer was called from a worker thread"
        log.append(("write", key))
        return real_raw(self, key, spans)

    monkeypatch.setattr(SafetensorsWriter, "write", write)
    monkeypatch.setattr(SafetensorsWriter, "write_raw", write_raw)
    return log


def most_groups_loaded_and_not_written(log: list[tuple[str, str]]) -> int:
    outstanding = most = 0
    for kind, _ in log:
        outstanding += 1 if kind == "load" else -1
        most = max(most, outstanding)
    return most


def run(tmp_path, events, **options) -> sb.RunReport:
    target = tmp_path / "out.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every group fits the budget: no warning
        report = sb.run(Recording(state(), events), CAST, target, progress=False, **options)
    out = load_file(target)
    assert {k: v.tolist() for k, v in out.items()} == {k: v.half().tolist() for k, v in state().items()}
    return report


@pytest.mark.parametrize("workers", [2, 4])
def test_a_budget_smaller_than_two_groups_keeps_one_group_in_flight_whatever_the_workers(tmp_path, events, workers):
    report = run(tmp_path, events, max_memory=GROUP * 3 // 2, workers=workers)
    assert report.stats.budget == GROUP * 3 // 2
    assert report.stats.peak_in_flight == GROUP
    # the next group is loaded only once the previous one is written
    assert most_groups_loaded_and_not_written(events) == 1, events


@pytest.mark.parametrize(("groups", "workers"), [(2, 4), (3, 4), (2, 2), (1, 1)])
def test_the_budget_and_the_workers_each_bound_the_groups_in_flight(tmp_path, events, groups, workers):
    budget = GROUP * groups + GROUP // 2
    report = run(tmp_path, events, max_memory=budget, workers=workers)
    assert report.stats.peak_in_flight == GROUP * groups
    assert most_groups_loaded_and_not_written(events) <= groups
    plenty = run(tmp_path / "plenty", events, max_memory=10**9, workers=workers)
    assert plenty.stats.peak_in_flight == GROUP * min(workers, GROUPS)


def test_a_group_over_the_budget_runs_alone_and_says_so(tmp_path, events):
    with pytest.warns(RuntimeWarning, match=r"group \[t\d\] -> \[t\d\] needs 6.0 KB in memory, more than the budget of 5.0 KB") as caught:
        report = sb.run(Recording(state(), events), CAST, tmp_path / "out.safetensors", progress=False, max_memory=5000, workers=3)
    assert sorted(str(w.message).split("]")[0] for w in caught) == [f"group [t{i}" for i in range(GROUPS)]  # one per group
    assert report.stats.peak_in_flight == GROUP
    assert most_groups_loaded_and_not_written(events) == 1


def test_the_default_budget_is_half_the_available_memory_shared_by_the_local_ranks(monkeypatch):
    monkeypatch.setattr(execute_module, "available_memory", lambda: 10 * 1024**3)
    assert default_budget() == 5 * 1024**3
    assert default_budget(4) == 5 * 1024**3 // 4
    assert default_budget(0) == 5 * 1024**3  # never divided by zero ranks
    monkeypatch.setattr(execute_module, "available_memory", lambda: 100 * 1024**2)
    assert default_budget() == MIN_DEFAULT_BUDGET == 256 * 1024**2  # the floor, when memory is short


def test_a_run_without_max_memory_keeps_to_the_default_budget(tmp_path, events, monkeypatch):
    monkeypatch.setattr(execute_module, "available_memory", lambda: 3 * 1024**3)
    report = run(tmp_path, events, workers=2)
    assert report.stats.budget == 3 * 1024**3 // 2


def test_available_memory_reads_memavailable():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    if "MemAvailable" not in fields:
        pytest.skip("no MemAvailable in /proc/meminfo")
    total = int(fields["MemTotal"].split()[0]) * 1024
    assert 0 < execute_module.available_memory() <= total


class Threads(sb.Transform):
    """Records how many intra-op threads torch offers while a group computes."""

    name = "record_threads"
    seen: list[int] = []

    def plan(self, metas):
        def fn(x: torch.Tensor) -> torch.Tensor:
            Threads.seen.append(torch.get_num_threads())
            return x * 2

        return [sb.Group.map_one(key, key, meta, fn, "double") for key, meta in metas.items()]


@pytest.mark.parametrize(("workers", "during"), [(1, 4), (2, 2), (3, 1), (8, 1)])
def test_torch_threads_are_shared_among_the_workers_for_the_run_and_given_back(tmp_path, workers, during):
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        Threads.seen = []
        sb.run(state(), [Threads()], tmp_path / "out.safetensors", progress=False, workers=workers)
        assert Threads.seen == [during] * GROUPS
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_load_into_keeps_to_max_memory_and_shares_threads_among_workers():
    model = torch.nn.Linear(NUMEL, 2, bias=False)
    source = {"weight": torch.ones(2, NUMEL)}
    with pytest.warns(RuntimeWarning, match="more than the budget of 100 B"):
        sb.load_into(model, source, max_memory=100)
    assert torch.equal(model.weight.detach(), torch.ones(2, NUMEL))
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        Threads.seen = []
        sb.load_into(model, source, [Threads()], workers=2)
        assert Threads.seen == [2]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(model.weight.detach(), torch.full((2, NUMEL), 2.0))
