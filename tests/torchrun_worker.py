"""A script for ``torchrun`` (tests/test_distributed.py): every rank runs the same conversions.

``torchrun ... torchrun_worker.py SOURCE OUT SCENARIO...`` runs each scenario in
turn in one job and prints one JSON line per scenario: this rank, the scenario,
the files reported and the error (``"Type: message"``) or null.  Without
torchrun it is a single-process run, for comparison.

- ``ok``: q/k/v fusion and a cast into a sharded folder;
- ``fail``: the same, but rank 1 raises while computing one group;
- ``targets``: each rank names its own target (the ranks must agree);
- ``steps``: each rank scales the norms by another factor (same output layout, other values);
- ``shards``: each rank asks for another shard size;
- ``sources``: rank 1 reads a copy of the source (``SOURCE-copy``) instead;
- ``torch``: a torch-format target, which ranks cannot share;
- ``die``: rank 1's process ends outright while computing (run it alone: the job ends).

A scenario that raises anything, a KeyboardInterrupt from SIGTERM included, is reported.
"""

from __future__ import annotations

import json
import os
import sys

import statebridge as sb

RANK = os.environ.get("RANK", "0")
STEPS = [
    sb.Concat(
        inputs=[f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
        output="model.layers.*.self_attn.qkv_proj.weight",
    ),
    sb.Cast(pattern="model.layers.*.mlp.**", dtype="bf16"),
]


class TroubleOnRank1(sb.Transform):
    """Doubles the mlp weights; on rank 1 the last of them raises (``fail``) or ends the process (``die``)."""

    name = "trouble_on_rank_1"

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def plan(self, metas):
        keys = [k for k in metas if ".mlp." in k]

        def compute(tensors, key):
            if key == keys[-1] and RANK == "1":
                if self.how == "die":
                    os._exit(3)
                raise RuntimeError("disk on fire on rank 1")
            return {key: tensors[key] * 2}

        return [sb.Group((k,), {k: metas[k]}, lambda t, k=k: compute(t, k), ("double",)) for k in keys]


def convert(source: str, out: str, scenario: str) -> list[str]:
    steps = STEPS + [TroubleOnRank1(scenario)] if scenario in ("fail", "die") else STEPS
    if scenario == "steps":
        steps = STEPS + [sb.ValueOp(pattern="model.norm.weight", op="scale", args={"factor": 2.0 + int(RANK)})]
    if scenario == "sources" and RANK == "1":
        source += "-copy"
    target = {"targets": f"{out}/targets-{RANK}", "torch": f"{out}/model.pt"}.get(scenario, f"{out}/{scenario}")
    shard_size = 100_000 + 50_000 * int(RANK) if scenario == "shards" else 150_000
    report = sb.run(source, steps, target, shard_size=shard_size, progress=False)
    return [str(f) for f in report.files]


def main(source: str, out: str, *scenarios: str) -> None:
    for scenario in scenarios:
        files, error = None, None
        try:
            files = convert(source, out, scenario)
        except BaseException as e:  # reported to the test, which checks every rank's outcome
            error = f"{type(e).__name__}: {e}"
        # one write per line: both ranks share the pipe, and short writes to a pipe are not interleaved
        sys.stdout.write(json.dumps({"rank": int(RANK), "scenario": scenario, "files": files, "error": error}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
