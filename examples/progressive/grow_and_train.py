"""Grow a small model 4 -> 6 blocks and 1x -> 2x width, keep its function, train on with EWC, save a .tprog.

    python examples/progressive/grow_and_train.py [OUT_FOLDER]

1. A random 4-block Llama (hidden 64, GQA 4/2 heads) trains a few steps on an "old task"
   and is saved as ``small.tprog``.
2. ``grow_depth`` (LLaMA-Pro, 4 -> 6 blocks) and ``grow_width`` (factor 2, HyperCloning) stream
   it into ``deeper.tprog`` and ``grown.tprog``; each growth appends to ``expansion_history``,
   and the grown model's logits are the small model's (printed: max |difference|).
3. EWC anchors the grown model on the old task (sampled true Fisher), it trains a few steps
   on a "new task" with ``loss + ewc.penalty(model)``, and ``trained.tprog`` is saved with the
   optimizer state, the RNG state and the EWC anchor.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from statebridge_progressive import tprog
from statebridge_progressive.depth import GrowDepth
from statebridge_progressive.ewc import EWC
from statebridge_progressive.width import GrowWidth

VOCAB, LENGTH = 96, 32
LAMBDA = 1e4  # the Fisher of a model that fits its task well is small: EWC needs a large lambda to hold it


def task(seed: int, batches: int = 4) -> list[torch.Tensor]:
    """Token sequences of one "task": a repeating pattern whose step is the seed, so the model can learn it."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (batches, 8, 1), generator=generator)
    return [(start + seed * torch.arange(LENGTH)) % VOCAB for start in starts]


def train(model: torch.nn.Module, data: list[torch.Tensor], steps: int, ewc: EWC | None = None,
          optimizer: torch.optim.Optimizer | None = None) -> tuple[float, torch.optim.Optimizer]:
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        ids = data[step % len(data)]
        loss = model(ids, labels=ids).loss
        total = loss + (ewc.penalty(model) if ewc is not None else 0.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach()), optimizer


def from_tprog(path: Path) -> torch.nn.Module:
    checkpoint = tprog.read(path)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint.config))
    checkpoint.load_into(model)
    return model.eval()


def next_token_rows(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits aligned with the next token (the last position predicts nothing we have)."""
    return model(ids).logits[:, :-1]


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
    model = LlamaForCausalLM(config)
    old_task, new_task = task(3), task(5)
    loss, _ = train(model, old_task, steps=30)
    print(f"small model: 4 blocks, hidden 64; old-task loss after 30 steps {loss:.3f}")
    small = tprog.save(out / "small.tprog", model, config.to_dict(), family="tiny-llama", overwrite=True)

    deeper = tprog.grow(small, [GrowDepth(method="llama_pro", num_layers=6)], out / "deeper.tprog", overwrite=True).target
    grown = tprog.grow(deeper, [GrowWidth(head_dim=16, factor=2)], out / "grown.tprog", overwrite=True).target
    big = from_tprog(grown)
    probe = old_task[0]
    with torch.no_grad():
        delta = float((big(probe).logits - model.eval()(probe).logits).abs().max())
    size = tprog.read_meta(grown).current_size
    print(f"grown model: {size.num_layers} blocks, hidden {size.hidden_size}, {size.parameters:,} parameters; "
          f"max |logit difference| to the small model {delta:.2e}")

    ewc = EWC.from_model(big, [(old_task[0][:4], old_task[0][:4, 1:])], lam=LAMBDA, kind="true", samples=1,
                         forward=next_token_rows)
    plain = copy.deepcopy(big)
    with torch.no_grad():
        before = float(big(old_task[0], labels=old_task[0]).loss)
    loss, optimizer = train(big, new_task, steps=10, ewc=ewc)
    plain_loss, _ = train(plain, new_task, steps=10)
    with torch.no_grad():
        after, forgot = (float(m(old_task[0], labels=old_task[0]).loss) for m in (big, plain))
    print(f"10 steps on the new task: with EWC (lambda {LAMBDA:g}, {ewc.samples} sampled-Fisher predictions) new-task "
          f"loss {loss:.3f}, old-task loss {before:.3f} -> {after:.3f}; without EWC {plain_loss:.3f} and {before:.3f} -> {forgot:.3f}")

    meta = tprog.read_meta(grown)
    meta = meta.model_copy(update={"training_progress": tprog.TrainingProgress(steps=40, tokens_seen=40 * 8 * LENGTH)})
    trained = tprog.save(out / "trained.tprog", big, tprog.read(grown).config, meta, optimizer=optimizer, rng=True,
                         ewc=ewc, overwrite=True)
    history = [h.method for h in tprog.read_meta(trained).expansion_history]
    print(f"saved {trained}: expansion_history {history}, files "
          + ", ".join(sorted(str(p.relative_to(trained)) for p in trained.rglob("*") if p.is_file())))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="progressive-")))
