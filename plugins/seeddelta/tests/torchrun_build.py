"""A script for ``torchrun`` (test_distributed.py): every rank calls the builder's API, as a user's script would.

``torchrun ... torchrun_build.py ROOT SCENARIO...`` runs each scenario in turn in one job, in
``ROOT/SCENARIO`` (the model, inputs and policy are in ROOT, named relative to it, as the
sequential command line in the test names them), and prints one JSON line per rank and
scenario: the rank, the scenario, a digest of the report without its timings (rank 0 also
writes that report to ``report.json``) and the error (``"Type: message"``) or null.

- ``ok``: a build of every FFN weight into ``out.gguf``;
- ``fail``: the same with ``bad.safetensors``, whose last weight's inputs have the wrong width: only rank 1 fits it;
- ``differ``: rank 1 names another policy (the ranks must agree);
- ``unreadable``: rank 1 names a policy file that does not exist (as on a machine without it);
- ``missing``: every rank names a model that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from statebridge_seeddelta.build import Inputs, build

RANK = int(os.environ.get("RANK", "0"))


def untimed(report: Any) -> Any:
    """The report without what the clock decides (``seconds``, ``fit_seconds``)."""
    if isinstance(report, dict):
        return {k: untimed(v) for k, v in report.items() if k not in ("seconds", "fit_seconds")}
    if isinstance(report, list):
        return [untimed(v) for v in report]
    return report


def convert(scenario: str) -> dict[str, Any]:
    policy = {"differ": "../policy-k8.json", "unreadable": "../absent.json"}.get(scenario, "../policy.json") \
        if RANK == 1 else "../policy.json"
    activations = "../bad.safetensors" if scenario == "fail" else "../fit.safetensors"
    model = "../absent.safetensors" if scenario == "missing" else "../llama.safetensors"
    return build(model, "out.gguf", policy=policy, inputs=Inputs(activations))


def main(root: str, *scenarios: str) -> None:
    for scenario in scenarios:
        folder = Path(root) / scenario
        folder.mkdir(exist_ok=True)
        os.chdir(folder)
        digest, error = None, None
        try:
            report = json.dumps(untimed(convert(scenario)), indent=2) + "\n"
            digest = hashlib.sha256(report.encode()).hexdigest()
            if RANK == 0:
                Path("report.json").write_text(report)
        except BaseException as e:  # reported to the test, which checks every rank's outcome
            error = f"{type(e).__name__}: {e}"
        # one short write per line: both ranks share the pipe, and short writes to a pipe are not interleaved
        sys.stdout.write(json.dumps({"rank": RANK, "scenario": scenario, "digest": digest, "error": error}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
