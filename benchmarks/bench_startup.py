"""Start-up: how long ``statebridge --help`` and ``statebridge inspect FILE`` take as whole processes.

Both import every installed plugin's entry-point module but never torch, pydantic or the
planning machinery.  The baseline, measured in the same run, is a bare interpreter
(``python -c pass``); the target is 0.15 s for each command.  Prints medians and ranges of
``--repeat`` runs, interleaved so that a noisy neighbour hits every case alike.

    python benchmarks/bench_startup.py --repeat 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    statebridge = [sys.executable, "-m", "statebridge"]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "small.safetensors"
        header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
        checkpoint.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "statebridge --help": [*statebridge, "--help"],
            "statebridge inspect FILE": [*statebridge, "inspect", str(checkpoint)],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for command in cases.values():  # warm the page cache and the bytecode caches
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
        for _ in range(args.repeat):
            for name, command in cases.items():
                started = time.perf_counter()
                subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, check=True)
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["python -c pass"])
    print(f"{'case':28}{'median':>9}{'range':>18}{'vs python':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28}{median:>8.3f}s{min(values):>8.3f}-{max(values):.3f}s{median / base:>10.1f}x")


if __name__ == "__main__":
    main()
