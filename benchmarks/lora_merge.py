"""LoRA merge benchmark: ``statebridge lora merge`` against PEFT's ``merge_and_unload`` + ``save_pretrained``.

The base is the benchmarks' llama-style checkpoint (2.46 GB, hidden 2048, 25 layers; float16
by default) as a transformers model folder, and the adapter a real PEFT one: ``get_peft_model``
with rank 16 on all seven projections (q, k, v, o, gate, up, down) and
``init_lora_weights=False``, so ``lora_B`` is random and every merge changes the weights, then
``save_pretrained``.  Both are written once per run in a temporary folder, deleted at the end.

Cases, each a whole process, round robin, medians of ``--repeat`` runs:

- PEFT: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained`` (safetensors): what users run;
- ``statebridge lora merge BASE ADAPTER OUT``, with its merge report (the default);
- the same with ``--no-report``.

Before the timed runs the script merges once each way and checks that every tensor of the two
outputs is bitwise equal.  It prints the ratios to PEFT and the bound of issue 10 on peak RSS
(twice the largest group + 300 MB; PEFT holds the whole model).

    .venv/bin/python benchmarks/lora_merge.py [--repeat 3] [--dtype bfloat16] [--layers 25] [--before OLD/core:OLD/plugins/lora/src]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_2_5G, MB, compare, llama_config, machine, parser, python_case, remove, table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: run in its own process, so this one never holds the model: a real PEFT adapter, random lora_B
MAKE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base, adapter, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, sys.argv[4]))
config = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)  # False: B is not zero
get_peft_model(model, config).save_pretrained(adapter)
"""

PEFT_SETUP = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
BASE, ADAPTER, OUT, DTYPE = {base!r}, {adapter!r}, {out!r}, torch.{dtype}
"""
PEFT_WORK = """
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=DTYPE)
model = PeftModel.from_pretrained(model, ADAPTER).merge_and_unload()
model.save_pretrained(OUT)
"""


def build(tmp: Path, layers: int, dtype: str) -> tuple[Path, Path]:
    """The base model folder and the PEFT adapter folder, written under ``tmp``."""
    import torch
    from statebridge.testing import LlamaShape, write_llama

    sizes = {**LLAMA_2_5G, "layers": layers}
    base, adapter = tmp / "base", tmp / "adapter"
    base.mkdir()
    print(f"writing the base ({LlamaShape(**sizes).nbytes_fp16 / 1e9:.2f} GB {dtype}) and the adapter...", flush=True)
    write_llama(base / "model.safetensors", LlamaShape(**sizes), dtype=getattr(torch, dtype))
    config = llama_config(sizes)
    config.dtype = dtype
    config.save_pretrained(base)
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(base), str(adapter), ",".join(TARGETS), dtype], check=True)
    return base, adapter


def peft_case(base: Path, adapter: Path, out: Path, dtype: str) -> list[str]:
    return python_case(PEFT_SETUP.format(base=str(base), adapter=str(adapter), out=str(out), dtype=dtype), PEFT_WORK)


def cases(base: Path, adapter: Path, out: Path, dtype: str, before: str | None) -> list[tuple[str, list[str]]]:
    cli = [sys.executable, "-m", "statebridge", "lora", "merge", str(base), str(adapter), str(out)]
    commands = [
        ("PEFT merge_and_unload + save_pretrained", peft_case(base, adapter, out, dtype)),
        ("statebridge lora merge", cli),
        ("statebridge lora merge --no-report", [*cli, "--no-report"]),
    ]
    if before is not None:  # another version of statebridge and the plugin, measured in the same rounds
        commands.append(("statebridge lora merge (--before)", ["env", f"PYTHONPATH={before}", *cli]))
    return commands


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """How many tensors the two model folders hold, and the keys that differ (missing, other dtype or other bits)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        return {key: f for f in sorted(folder.glob("*.safetensors")) for key in safe_open(f, "pt").keys()}

    left, right = index(a), index(b)
    differ = sorted(set(left) ^ set(right))
    for key in sorted(set(left) & set(right)):
        with safe_open(left[key], "pt") as x, safe_open(right[key], "pt") as y:
            t, u = x.get_tensor(key), y.get_tensor(key)
            if t.dtype != u.dtype or t.shape != u.shape or not torch.equal(t.view(torch.uint8), u.view(torch.uint8)):
                differ.append(key)
    return len(left), differ


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="the base's dtype (default float16)")
    p.add_argument("--layers", type=int, default=LLAMA_2_5G["layers"], help="decoder layers (default 25: 2.46 GB)")
    p.add_argument("--before", help="a PYTHONPATH with another version's core/ and plugins/lora/src/ to measure beside")
    args = p.parse_args()
    from bench_convert import largest_group

    tmp = Path(tempfile.mkdtemp(prefix="statebridge-lora-bench-"))
    try:
        base, adapter = build(tmp, args.layers, args.dtype)
        out = tmp / "out"
        size = (base / "model.safetensors").stat().st_size
        print(f"machine: {machine()}\nbase: {size / 1e9:.2f} GB {args.dtype}; adapter: rank 16 on {', '.join(TARGETS)} "
              f"({(adapter / 'adapter_model.safetensors').stat().st_size / MB:.0f} MB)")
        commands = cases(base, adapter, out, args.dtype, args.before)
        check = tmp / "peft-out"
        subprocess.run(peft_case(base, adapter, check, args.dtype), check=True)
        subprocess.run(commands[1][1], check=True, capture_output=True)
        count, differ = same_tensors(check, out)
        print(f"bitwise check: {count} tensors, {len(differ)} differ from PEFT's" + (f": {differ[:5]}" if differ else " (all equal)"))
        shutil.rmtree(check)
        shutil.rmtree(out)
        results = compare(commands, args.repeat, remove(out))
        peft = commands[0][0]
        ratios = {"wall ÷ PEFT": ("wall", peft), "peak ÷ PEFT": ("peak", peft)}
        print(table(f"merging a rank-16 adapter into {size / 1e9:.2f} GB {args.dtype}, median of {args.repeat}", results, ratios))
        group = largest_group(base, [{"lora_merge": {"adapter": str(adapter)}}])
        print(f"\n  largest computed group: {group / MB:.0f} MB (inputs and outputs); "
              f"bound 2x group + 300 MB = {2 * group / MB + 300:.0f} MB")
        for r in results:
            wall = r.wall
            print(f"  {r.name}: wall {r.value('wall'):.1f} s (range {min(wall):.1f}-{max(wall):.1f} s), "
                  f"{r.value('wall') / results[0].value('wall'):.2f}x PEFT; peak RSS {r.value('peak') / MB:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
