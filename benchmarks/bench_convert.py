"""Conversion benchmark: rename-only and q/k/v fusion of a 2.5 GB fp16 llama-style checkpoint.

Each conversion is compared, in the same run, with ``cp`` of the checkpoint,
with and without an fsync of the copy (measured once per round, round robin
with every other case, and shared by both tables), and with the plain script
people write (``load_file``, edit the dict, ``save_file``).  statebridge makes
what it commits durable by default (early writeback, then fsync); the
``--no-fsync`` / ``durable=False`` rows commit as ``cp`` does, leaving the data
in the page cache for the kernel to write back.

Neither conversion computes a tensor in statebridge: a rename and a
concatenation along the first dimension are both raw byte copies, and torch is
never imported, so the statebridge cases import only statebridge before the
timed part (the plain script imports torch, which it needs).

    .venv/bin/python benchmarks/bench_convert.py [--repeat 5] [--size 10g --only rename]

``--size 10g`` uses a 9.7 GB checkpoint instead: larger than the kernel lets a
process keep as dirty page cache (20 % of memory by default), so ``cp`` too
ends up waiting for the disk, as it does for any checkpoint that matters.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, LLAMA_2_5G, LLAMA_10G, MB, compare, llama_checkpoint, machine, parser, python_case, remove, table  # noqa: E402

RENAME = [{"rename": {"pattern": "model.**", "to": "**"}}]
FUSE = [
    {
        "concat": {
            "inputs": [f"model.layers.*.self_attn.{x}_proj.weight" for x in "qkv"],
            "output": "model.layers.*.self_attn.qkv_proj.weight",
        }
    }
]

PLAIN_SETUP = "from safetensors.torch import load_file, save_file\nimport torch"
PLAIN_RENAME = "state = {k.removeprefix('model.'): v for k, v in load_file(SRC).items()}\nsave_file(state, DST, metadata={'format': 'pt'})"
PLAIN_FUSE = """
state = load_file(SRC)
for i in range(LAYERS):
    p = f'model.layers.{i}.self_attn.'
    state[p + 'qkv_proj.weight'] = torch.cat([state.pop(p + f'{x}_proj.weight') for x in 'qkv'])
save_file(state, DST, metadata={'format': 'pt'})
"""
FSYNC = "\nfd = os.open(DST, os.O_RDONLY); os.fsync(fd); os.close(fd)"
SB_SETUP = "import statebridge as sb\nfrom statebridge.config import parse_config\nfrom statebridge.plugins import installed\ninstalled().transforms"
SB_RUN = "config = parse_config(CONFIG)\nsb.run(config.source, config.pipeline(), config.target, progress=False, workers={}, durable={})"

#: name -> (steps, the plain script doing the same)
CONVERSIONS = {"rename": (RENAME, PLAIN_RENAME), "qkv-fusion": (FUSE, PLAIN_FUSE)}
BASELINES = ("cp", "cp + fsync")


SIZES = {"2.5g": ("llama-2.5g", LLAMA_2_5G), "10g": ("llama-10g", LLAMA_10G)}


def cases(source: Path, out: Path, layers: int, only: list[str], plain_cases: bool) -> list[tuple[str, list[str]]]:
    """``cp`` and ``cp + fsync`` once, then each conversion's cases, labelled ``conversion: case``."""
    target = out / "converted.safetensors"
    commands = [
        ("cp", ["cp", str(source), str(target)]),
        ("cp + fsync", ["sh", "-c", f"cp '{source}' '{target}' && sync '{target}'"]),
    ]
    for name, (steps, plain) in CONVERSIONS.items():
        if name not in only:
            continue
        config = {"source": str(source), "target": str(target), "steps": steps}
        config_file = out / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        defs = f"SRC, DST, LAYERS, CONFIG = {str(source)!r}, {str(target)!r}, {layers}, {config!r}"
        setup = f"{SB_SETUP}\n{defs}"
        cli = [sys.executable, "-m", "statebridge", "run", str(config_file), "--no-progress"]
        if plain_cases:
            commands += [
                (f"{name}: plain script", python_case(f"{PLAIN_SETUP}\n{defs}", plain)),
                (f"{name}: plain script + fsync", python_case(f"{PLAIN_SETUP}\n{defs}", plain + FSYNC)),
            ]
        commands += [
            (f"{name}: statebridge run (CLI)", cli),
            (f"{name}: statebridge run --no-fsync (CLI)", [*cli, "--no-fsync"]),
            (f"{name}: statebridge.run", python_case(setup, SB_RUN.format(1, True))),
            (f"{name}: statebridge.run, 2 workers", python_case(setup, SB_RUN.format(2, True))),
            (f"{name}: statebridge.run, durable=False", python_case(setup, SB_RUN.format(1, False))),
        ]
    return commands


def largest_group(source: Path, steps: list[dict]) -> int:
    """The largest group that is computed (not copied as raw bytes), inputs and outputs."""
    import statebridge as sb
    from statebridge.config import parse_config

    plan = sb.plan(source, parse_config({"source": str(source), "steps": steps}).pipeline())
    metas = plan.source.metas()
    return max(
        (sum(metas[k].nbytes for k in g.inputs) + sum(m.nbytes for m in g.outputs.values()) for g in plan.groups if len(plan.raw_spans(g)) < len(g.outputs)),
        default=0,
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="2.5g", help="the checkpoint (default 2.5g)")
    p.add_argument("--only", default=",".join(CONVERSIONS), help="conversions to run, comma-separated (default: all)")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain script (it holds the whole checkpoint)")
    args = p.parse_args()
    name, sizes = SIZES[args.size]
    only = args.only.split(",")
    source = llama_checkpoint(name, sizes) / "model.safetensors"
    out = CACHE / "out"
    out.mkdir(exist_ok=True)
    print(f"machine: {machine()}\nsource: {source} ({source.stat().st_size / 1e9:.2f} GB)")
    results = compare(cases(source, out, sizes["layers"], only, not args.no_plain), args.repeat, remove(out / "converted.safetensors"))
    baselines = [r for r in results if r.name in BASELINES]
    cp, durable_cp = (r.value("time") for r in baselines)
    for name, (steps, _) in CONVERSIONS.items():
        if name not in only:
            continue
        rows = baselines + [replace(r, name=r.name.removeprefix(f"{name}: ")) for r in results if r.name.startswith(f"{name}: ")]
        ratios = {
            "time ÷ cp": ("time", "cp"),
            "time ÷ cp+fsync": ("time", "cp + fsync"),
            "wall ÷ cp": ("wall", "cp"),
            **({"time ÷ plain": ("time", "plain script")} if not args.no_plain else {}),
        }
        print(table(f"{name}: {source.stat().st_size / 1e9:.2f} GB fp16, median of {args.repeat}", rows, ratios))
        for r in rows:
            if r.name.startswith("statebridge.run"):
                print(f"  {r.name}: {r.value('time') / cp:.2f}x cp, {r.value('time') / durable_cp:.2f}x cp+fsync; peak RSS "
                      f"{r.value('peak') / MB:.0f} MB, {r.value('rise') / MB:.0f} MB above the process after imports")
        print(f"  largest computed group: {largest_group(source, steps) / MB:.0f} MB")


if __name__ == "__main__":
    main()
