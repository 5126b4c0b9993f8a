"""Large plans: planning a checkpoint of 200,000 tensors from its header, and running it.

Mixture-of-experts checkpoints hold about 100,000 tensors; this one holds 200,450 tiny ones
(64 layers of 1,042 experts, 3 projections each, plus attention and norms; 25 MB in all), so
the figures are the cost of planning, not of bytes.  Every case runs in a fresh process:

- ``json.loads``: a plain script that reads the header and parses it (the floor: any tool
  must do at least this), the baseline of the ratios;
- ``sb.plan``: ``statebridge.plan(FILE, [rename model.** -> **])``, timed inside the process
  (imports excluded);
- ``statebridge plan``: the command, a whole process;
- ``statebridge run``: the command writing the renamed checkpoint (planned once).

Each reports wall time and peak RSS (``ru_maxrss`` of the child); medians and ranges of
``--repeat`` runs, interleaved so that a noisy neighbour hits every case alike.  The targets
(issue 15): 200,000 tensors planned in at most 2 s and 300 MB.

    python benchmarks/bench_plan_scale.py --repeat 5 [--tensors 200000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, measure  # noqa: E402

from statebridge.testing import write_many_tensors  # noqa: E402

PLAIN = """
import json, struct, sys, time
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    started = time.perf_counter()
    header = json.loads(f.read(n))
print(time.perf_counter() - started)
"""
SB_PLAN = """
import sys, time
import statebridge as sb
plan = sb.plan  # statebridge imports its API when first asked for it: an import, outside the timed part
started = time.perf_counter()
plan = plan(sys.argv[1], [{"rename": {"pattern": "model.**", "to": "**"}}])
print(time.perf_counter() - started)
assert len(plan.outputs) == int(sys.argv[2]), len(plan.outputs)
"""


def run_case(command: list[str]) -> tuple[float, float, float | None]:
    """Wall seconds, peak RSS in MB, and the seconds the case printed for its timed part (if it did)."""
    wall, peak, text = measure(command)
    printed = [line for line in text.splitlines() if line.replace(".", "", 1).replace("e-", "", 1).isdigit()]
    return wall, (peak or 0) / 1e6, float(printed[-1]) if printed else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tensors", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "moe.safetensors"
        count = write_many_tensors(checkpoint, args.tensors)
        out = Path(folder) / "out.safetensors"
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the cases run from cached bytecode, as installed code does
        python, statebridge = sys.executable, [sys.executable, "-m", "statebridge"]
        config = Path(folder) / "rename.yaml"
        config.write_text('steps:\n  - rename: {pattern: "model.**", to: "**"}\n')
        cases = {
            "json.loads (baseline)": [python, "-c", PLAIN, str(checkpoint)],
            "sb.plan": [python, "-c", SB_PLAN, str(checkpoint), str(count)],
            "statebridge plan": [*statebridge, "plan", str(config), "--source", str(checkpoint)],
            "statebridge run": [*statebridge, "run", str(config), "--source", str(checkpoint), "--target", str(out), "--no-progress"],
        }
        results: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, command in cases.items():
                out.unlink(missing_ok=True)
                results[name].append(run_case(command))
    print(f"{count:,} tensors, {args.repeat} runs each (median, range); {machine()}")
    base = statistics.median(r[2] for r in results["json.loads (baseline)"])
    print(f"{'case':24}{'timed part':>22}{'whole process':>22}{'peak RSS':>20}{'vs json':>9}")
    for name, runs in results.items():
        walls, peaks, inner = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs if r[2] is not None]
        timed = f"{statistics.median(inner):.2f} s ({min(inner):.2f}-{max(inner):.2f})" if inner else "-"
        ratio = f"{statistics.median(inner) / base:.1f}x" if inner else "-"
        print(
            f"{name:24}{timed:>22}{statistics.median(walls):>9.2f} s ({min(walls):.2f}-{max(walls):.2f})"
            f"{statistics.median(peaks):>9.0f} MB ({min(peaks):.0f}-{max(peaks):.0f}){ratio:>9}"
        )


if __name__ == "__main__":
    main()
