"""Distributed benchmark: 1 vs 2 torchrun processes on a compute-heavy pipeline, same output bytes.

The pipeline rotates the residual stream of a 1.4 GB fp16 llama-style
checkpoint (``rotate`` in benchmarks/rotate.py: a float32 matmul per weight).
torchrun gives each of several processes one intra-op thread
(``OMP_NUM_THREADS=1``), so the comparison runs the single process with one
thread too: it measures what splitting the work between processes buys.  The
last row, one process with a thread per core, shows what torch's own threads
already get from the same cores.

    .venv/bin/python benchmarks/bench_distributed.py [--repeat 3]
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, compare, llama_checkpoint, machine, parser, table  # noqa: E402

HEAVY = dict(layers=12, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ROTATE = str(Path(__file__).with_name("rotate.py"))


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(64 * 1024**2):
            sha.update(chunk)
    return sha.hexdigest()


CASES = (("1 process, 1 thread", 1, 1), ("2 processes, 1 thread each", 2, 1), ("1 process, 2 threads", 1, 2))


def main() -> None:
    args = parser(__doc__).parse_args()
    source = llama_checkpoint("llama-1.4g", HEAVY) / "model.safetensors"
    out = CACHE / "out"
    out.mkdir(exist_ok=True)
    print(f"machine: {machine()}\nsource: {source} ({source.stat().st_size / 1e9:.2f} GB); load average {os.getloadavg()}")
    commands, targets = [], {}
    for label, processes, threads in CASES:
        targets[label] = out / f"rotated-{processes}x{threads}.safetensors"
        config = out / f"rotate-{processes}x{threads}.yaml"
        config.write_text(yaml.safe_dump({"source": str(source), "target": str(targets[label]), "steps": [{"rotate": {"seed": 0}}]}))
        commands.append((label, ["env", f"OMP_NUM_THREADS={threads}", TORCHRUN, "--standalone",
                                 f"--nproc-per-node={processes}", ROTATE, "run", str(config), "--no-progress"]))
    digests: dict[str, set[str]] = {label: set() for label, *_ in CASES}

    def collect() -> None:
        """Keep the digest of whichever case just wrote its target, and remove it."""
        for label, target in targets.items():
            if target.exists():
                digests[label].add(digest(target))
                target.unlink()

    results = compare(commands, args.repeat, collect)
    ratios = {"wall ÷ 1 process": ("wall", "1 process, 1 thread"), "in-process ÷ 1 process": ("time", "1 process, 1 thread")}
    print(table(f"rotate {source.stat().st_size / 1e9:.2f} GB fp16 (compute-bound), median of {args.repeat}", results, ratios))
    identical = len(digests[CASES[0][0]] | digests[CASES[1][0]]) == 1
    one, two = results[0], results[1]
    print(f"\n  2 processes vs 1: {one.value('wall') / two.value('wall'):.2f}x faster for the whole torchrun job, "
          f"{one.value('time') / two.value('time'):.2f}x after the imports; every 1- and 2-process output "
          f"byte-identical: {identical}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
