"""Growing the benchmarks' 2.5 GB llama checkpoint by LLaMA-Pro block expansion, against cp of the output's size.

The source is the benchmarks' llama-style model folder (2.46 GB float16, hidden 2048, 25
blocks; ``common.llama_checkpoint``).  ``statebridge grow depth SRC OUT --method llama_pro
--num-layers 30`` inserts 5 blocks (after every 5th): every tensor of the 25 old blocks and
the 5 copies is a raw byte copy, the copies' ``o_proj`` and ``down_proj`` are written as
zeros, and config.json is edited.  The output (2.90 GB) is what ``cp`` is measured on: the
first, discarded run's output is kept aside (in the page cache, as the source is) and copied.

Cases, each a whole process, round robin, medians of ``--repeat`` runs:

- ``cp`` of the grown model.safetensors (no fsync), and ``cp + sync``;
- ``statebridge grow depth ... --no-fsync`` (atomic, like cp not power-cut safe);
- ``statebridge grow depth ...`` (durable: fsync before the commit).

Targets (issue 12): peak RSS ≤ 300 MB and time ≤ 1.5x cp of the output's size.

    .venv/bin/python benchmarks/progressive_grow.py [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_2_5G, MB, _read_through, compare, llama_checkpoint, machine, measure, parser, remove, table  # noqa: E402

LAYERS = 30


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the outputs")
    args = p.parse_args()
    source = llama_checkpoint("llama-2.5g", LLAMA_2_5G)
    folder = Path(tempfile.mkdtemp(prefix="progressive-grow-", dir=args.dir))
    out = folder / "grown"
    grow = [sys.executable, "-m", "statebridge", "grow", "depth", str(source), str(out), "--method", "llama_pro",
            "--num-layers", str(LAYERS)]
    try:
        print(f"machine: {machine()}")
        measure(grow)  # once, to make the file cp copies (and check the command works)
        reference = folder / "reference.safetensors"
        (out / "model.safetensors").rename(reference)
        shutil.rmtree(out)
        _read_through(reference)
        copy = folder / "copy.safetensors"
        cases = [
            ("cp", ["cp", str(reference), str(copy)]),
            ("cp + sync", ["sh", "-c", f"cp '{reference}' '{copy}' && sync"]),
            ("statebridge grow depth --no-fsync", [*grow, "--no-fsync"]),
            ("statebridge grow depth", grow),
        ]
        results = compare(cases, args.repeat, remove(out, copy))
        size = reference.stat().st_size
        print(table(f"llama_pro {LLAMA_2_5G['layers']} -> {LAYERS} blocks of {source / 'model.safetensors'} "
                    f"(output {size / 1e9:.2f} GB)", results,
                    {"time / cp": ("time", "cp"), "time / cp+sync": ("time", "cp + sync")}))
        for r in results:
            if r.name.startswith("statebridge"):
                peak = r.value("peak")
                print(f"{r.name}: peak RSS {peak / MB:.0f} MB (target <= 300 MB)" if peak else f"{r.name}: no peak measured")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
