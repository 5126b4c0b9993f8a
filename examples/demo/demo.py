"""The statebridge demo: a real pipeline on a small model, end to end (``make demo``).

1. Build a small Llama model (transformers, fixed seed) and write it as sharded safetensors.
2. ``statebridge inspect`` it, ``statebridge plan`` the q/k/v + gate/up fusion, ``statebridge run`` it.
3. Load the fused checkpoint into a meta-device Phi-3 model (which expects that layout)
   and show its logits equal the original model's.
4. Run the inverse pipeline and show the round trip is bitwise identical, file for file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import statebridge as sb

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("STATEBRIDGE_DEMO_OUT", ROOT / "demo-out")).resolve()
CONFIG = Path(__file__).with_name("llama_to_phi3.yaml")
MODEL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def banner(text: str) -> None:
    print(f"\n=== {text}")


def cli(*args: str) -> None:
    print(f"$ statebridge {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "statebridge", *args], check=True, cwd=ROOT)


def show(path: Path) -> str:
    """A path as the user would type it from the repository root."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def config_for(out: Path) -> Path:
    """The shipped config, or a copy pointing into ``out`` when the demo writes elsewhere."""
    if out == ROOT / "demo-out":
        return CONFIG
    config = yaml.safe_load(CONFIG.read_text())
    config.update(source=str(out / "llama"), target=str(out / "phi3"))
    copy = out / CONFIG.name
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def digests(folder: Path) -> dict[str, str]:
    """Per shard: a digest of its tensor names, shapes, dtypes and bytes, in file order.

    The provenance metadata (fingerprint, lineage) differs by design: it records
    which pipeline wrote the file.  Everything else must match bit for bit.
    """
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        source, digest = sb.open_source(path), hashlib.sha256()
        for key, meta in source.metas().items():
            span = source.raw_span(key)
            with open(path, "rb") as f:
                f.seek(span.offset)
                digest.update(f"{key}:{meta};".encode() + f.read(span.length))
        out[path.name] = digest.hexdigest()[:16]
    return out


def build_llama(out: Path) -> torch.nn.Module:
    """The demo's small Llama model (fixed seed), written to ``out/llama`` as sharded safetensors.

    Only the folders the demo writes are replaced (each by an atomic run);
    anything else a user keeps in ``out`` is left alone.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    sb.run(llama, None, out / "llama", shard_size=400_000, progress=False)
    return llama


def main() -> None:
    from accelerate import init_empty_weights
    from transformers import Phi3Config, Phi3ForCausalLM

    banner("1. a small Llama model, written as sharded safetensors")
    llama = build_llama(OUT)
    print(f"wrote {OUT / 'llama'}: {', '.join(digests(OUT / 'llama'))}")

    banner("2. inspect, plan (headers only), run")
    config = show(config_for(OUT))
    cli("inspect", show(OUT / "llama"))
    cli("plan", config)
    cli("run", config, "--no-progress")

    banner("3. load into a meta-device Phi-3 model that expects the fused layout")
    with init_empty_weights():
        phi3 = Phi3ForCausalLM(Phi3Config(**MODEL))
    sb.load_into(phi3, OUT / "phi3")
    phi3.eval()
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = llama(tokens).logits, phi3(tokens).logits
    difference = (expected - actual).abs().max().item()
    print(f"Llama logits vs Phi-3 logits on the converted weights: max |difference| = {difference}")
    if not torch.allclose(expected, actual, atol=1e-5, rtol=0):
        sys.exit("demo failed: the converted model does not reproduce the original outputs")

    banner("4. the inverse pipeline restores the original tensors and shard layout bit for bit")
    cli("run", config, "--inverse", "--source", show(OUT / "phi3"), "--target", show(OUT / "llama-again"), "--no-progress")
    original, again = digests(OUT / "llama"), digests(OUT / "llama-again")
    for name in original:
        print(f"  {name}: {original[name]}  {'==' if again.get(name) == original[name] else '!='}  {again.get(name)}")
    if original != again:
        sys.exit("demo failed: the round trip is not bitwise identical")
    print("\ndemo passed: fused conversion reproduces the model exactly and inverts bit for bit")


if __name__ == "__main__":
    main()
