"""Loading benchmark: a 2.5 GB fp16 llama-style checkpoint into a model, four ways, in the same run.

- ``load_state_dict(load_file())``: the model allocated (``to_empty``, no init), then the state dict;
- transformers ``from_pretrained`` (its own config.json beside the weights);
- ``statebridge.load_into`` into a model built with ``accelerate.init_empty_weights()`` and
  transformers' ``no_init_weights()`` (parameters on meta, no init: what ``from_pretrained``
  does inside), and into an allocated model (``to_empty``, as above);
- ``statebridge.load_into`` through a q/k/v + gate/up fusion into a Phi-3 model, which
  expects the fused layout.

Every case builds its model inside the timed part and imports the same modules
beforehand, so the times and memory rises compare the loading alone.

    .venv/bin/python benchmarks/bench_load.py [--repeat 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_2_5G, MB, compare, llama_checkpoint, machine, parser, python_case, table  # noqa: E402

SETUP = """
import torch, statebridge as sb
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
from transformers.initialization import no_init_weights
from transformers.utils import logging
from statebridge.plugins import installed
logging.set_verbosity_error()
installed().transforms
torch.set_default_dtype(torch.float16)
DIR = {folder!r}
PATH = DIR + "/model.safetensors"
config = LlamaConfig.from_pretrained(DIR)
phi3 = Phi3Config(**{{k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}}, pad_token_id=None)
FUSE = [sb.Concat(inputs=[f"model.layers.*.self_attn.{{x}}_proj.weight" for x in "qkv"], output="model.layers.*.self_attn.qkv_proj.weight"),
        sb.Concat(inputs=["model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"], output="model.layers.*.mlp.gate_up_proj.weight")]

def allocated(cls, config):
    with torch.device("meta"):
        model = cls(config)
    return model.to_empty(device="cpu")
"""
#: every case ends by reading one row of a late layer: proves the values arrived, touches a few pages only
CHECK = "\nextra['checksum'] = round(model.get_parameter('model.layers.20.mlp.down_proj.weight')[0, :64].float().sum().item(), 4)"
#: (build the model, load it): the load step is also timed on its own
CASES = {
    "load_state_dict(load_file())": ("model = allocated(LlamaForCausalLM, config)", "model.load_state_dict(load_file(PATH))"),
    "transformers from_pretrained": ("", "model = LlamaForCausalLM.from_pretrained(DIR, dtype=torch.float16)"),
    "load_into, empty-weights model": (
        "with init_empty_weights(), no_init_weights():\n    model = LlamaForCausalLM(config)",
        "sb.load_into(model, PATH)",
    ),
    "load_into, allocated model": ("model = allocated(LlamaForCausalLM, config)", "sb.load_into(model, PATH)"),
    "load_into + q/k/v, gate/up fusion, Phi-3": (
        "with init_empty_weights(), no_init_weights():\n    model = Phi3ForCausalLM(phi3)",
        "sb.load_into(model, PATH, FUSE)",
    ),
}


def work(build: str, load: str) -> str:
    return f"{build}\n_loading = time.perf_counter()\n{load}\nextra['load'] = time.perf_counter() - _loading{CHECK}"


def main() -> None:
    args = parser(__doc__).parse_args()
    folder = llama_checkpoint("llama-2.5g", LLAMA_2_5G)
    size = (folder / "model.safetensors").stat().st_size
    print(f"machine: {machine()}\nsource: {folder} ({size / 1e9:.2f} GB)")
    setup = SETUP.format(folder=str(folder))
    results = compare([(label, python_case(setup, work(*parts))) for label, parts in CASES.items()], args.repeat, lambda: None)
    ratios = {
        "time ÷ from_pretrained": ("time", "transformers from_pretrained"),
        "peak ÷ from_pretrained": ("peak", "transformers from_pretrained"),
        "time ÷ load_state_dict": ("time", "load_state_dict(load_file())"),
        "peak ÷ load_state_dict": ("peak", "load_state_dict(load_file())"),
    }
    print(table(f"loading {size / 1e9:.2f} GB fp16, median of {args.repeat}", results, ratios))
    print("\n  load step alone (last run): " + ", ".join(f"{r.name} {r.extra['load']:.3f} s" for r in results))
    print("  checksums (one row of layers.20 down_proj): " + ", ".join(str(r.extra["checksum"]) for r in results))
    group = 2 * 2 * LLAMA_2_5G["hidden"] * LLAMA_2_5G["intermediate"] * 2  # gate + up in, gate_up out, fp16
    fused = results[-1]
    print(f"  fusion into Phi-3: rise {fused.value('rise') / MB:.0f} MB; bound model + largest group + 200 MB = "
          f"{(size + group) / MB + 200:.0f} MB")


if __name__ == "__main__":
    main()
