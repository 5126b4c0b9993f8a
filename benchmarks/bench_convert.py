"""Conversion benchmark: rename-only and q/k/v fusion of a 2.5 GB fp16 llama-style checkpoint.

Each conversion is compared, in the same run, with ``cp`` of the checkpoint
(with and without an fsync of the copy) and with the plain script people write
(``load_file``, edit the dict, ``save_file``).  statebridge always makes what
it commits durable (early writeback, then fsync); the "durability off" row
patches both away in that process only, to show what the streaming itself
costs next to ``cp``, which leaves its copy in the page cache.

    .venv/bin/python benchmarks/bench_convert.py [--repeat 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, LLAMA_2_5G, MB, Result, compare, llama_checkpoint, machine, parser, python_case, remove, table  # noqa: E402

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
SB_SETUP = "import statebridge as sb\nfrom statebridge.config import parse_config\nfrom statebridge.plugins import load_plugins\nload_plugins()"
SB_RUN = "config = parse_config(CONFIG)\nsb.run(config.source, config.pipeline(), config.target, progress=False)"
NO_FSYNC = """
import statebridge.writers.safetensors as writer_module
os.fsync = writer_module.start_writeback = lambda fd: None  # measurement only: the streaming without durability
"""


def cases(name: str, steps: list[dict], plain: str, source: Path, out: Path, repeat_times: int) -> list[Result]:
    target = out / "converted.safetensors"
    config = {"source": str(source), "target": str(target), "steps": steps}
    config_file = out / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    defs = f"SRC, DST, LAYERS, CONFIG = {str(source)!r}, {str(target)!r}, {LLAMA_2_5G['layers']}, {config!r}"
    clean = remove(target)
    plan = [
        ("cp", ["cp", str(source), str(target)]),
        ("cp + fsync", ["sh", "-c", f"cp '{source}' '{target}' && sync '{target}'"]),
        ("plain script", python_case(f"{PLAIN_SETUP}\n{defs}", plain)),
        ("plain script + fsync", python_case(f"{PLAIN_SETUP}\n{defs}", plain + FSYNC)),
        ("statebridge run (CLI)", [sys.executable, "-m", "statebridge", "run", str(config_file), "--no-progress"]),
        ("statebridge.run", python_case(f"{SB_SETUP}\n{defs}", SB_RUN)),
        ("statebridge.run, durability off", python_case(f"{SB_SETUP}\n{defs}{NO_FSYNC}", SB_RUN)),
    ]
    print(f"{name}:", flush=True)
    return compare(plan, repeat_times, clean)


def largest_group(source: Path, steps: list[dict]) -> int:
    """The largest group that is computed (not copied as raw bytes), inputs and outputs."""
    import statebridge as sb
    from statebridge.config import parse_config

    plan = sb.plan(source, parse_config({"source": str(source), "steps": steps}).pipeline())
    metas = plan.source.metas()
    return max(
        (sum(metas[k].nbytes for k in g.inputs) + sum(m.nbytes for m in g.outputs.values()) for g in plan.groups if not g.renames),
        default=0,
    )


def main() -> None:
    args = parser(__doc__).parse_args()
    source = llama_checkpoint("llama-2.5g", LLAMA_2_5G) / "model.safetensors"
    out = CACHE / "out"
    out.mkdir(exist_ok=True)
    print(f"machine: {machine()}\nsource: {source} ({source.stat().st_size / 1e9:.2f} GB)")
    ratios = {
        "time ÷ cp": ("time", "cp"),
        "time ÷ cp+fsync": ("time", "cp + fsync"),
        "wall ÷ cp": ("wall", "cp"),
        "time ÷ plain": ("time", "plain script"),
    }
    for name, steps, plain in (("rename", RENAME, PLAIN_RENAME), ("qkv-fusion", FUSE, PLAIN_FUSE)):
        results = cases(name, steps, plain, source, out, args.repeat)
        print(table(f"{name}: {source.stat().st_size / 1e9:.2f} GB fp16, median of {args.repeat}", results, ratios))
        api = next(r for r in results if r.name == "statebridge.run")
        group = largest_group(source, steps)
        print(f"\n  statebridge.run: {api.value('time') / results[0].value('time'):.2f}x cp, "
              f"{api.value('time') / results[1].value('time'):.2f}x cp+fsync; peak RSS {api.value('peak') / MB:.0f} MB absolute, "
              f"{api.value('rise') / MB:.0f} MB above the process after imports; largest computed group {group / MB:.0f} MB")


if __name__ == "__main__":
    main()
