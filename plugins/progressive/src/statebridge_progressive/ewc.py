"""Elastic Weight Consolidation: keep what a model knew while it trains on (after growing, say).

**Which Fisher.**  The Fisher information of a model ``p(y | x, θ)`` is
``F = E_x E_{y ~ p(y|x,θ)} [∇ log p(y|x,θ)²]`` (diagonal: element-wise squares): the labels
are drawn from *the model*.  That is the **true** Fisher (``kind="true"``), the one EWC's
derivation calls for.  Using the *data's* labels instead gives the **empirical** Fisher
(``kind="empirical"``), ``E_{(x,y) ~ data} [∇ log p(y|x,θ)²]``: cheaper to reason about, equal
to the true one only where the model fits the data, and a different quantity (Kunstner et al.,
2019).  Mixing them up is the classic bug; so is squaring a *batch-mean* gradient, which is
neither.  Here the squares are always of one prediction's gradient, and each prediction
(a row of logits: a token of a language model, an example of a classifier) is one sample.
``kind="true"`` takes the exact expectation over the classes when ``samples`` is None (for
small output spaces; what the closed-form test checks) or draws ``samples`` labels per
prediction from the model (Monte Carlo, seeded; what a language model's vocabulary needs).

**The penalty** is ``(λ / 2) Σ_i F_i (θ_i − θ*_i)²`` (Kirkpatrick et al., 2017), with θ* the
parameters when the Fisher was taken: zero at θ*, and its gradient ``λ F (θ − θ*)``.

**Online accumulation** (online EWC, Schwarz et al., 2018): :meth:`EWC.update` takes the Fisher
of the current parameters and keeps ``F ← γ F_old + F_new`` and ``θ* ← θ``.

Saved as ``ewc/fisher.safetensors`` and ``ewc/old_params.safetensors`` in a ``.tprog``; the
settings go into ``progressive.json``'s ``ewc_config``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

Kind = Literal["true", "empirical"]
#: a model and a batch's inputs -> logits (..., classes); default: ``model(inputs)``, its ``.logits`` if it has them
Forward = Callable[[torch.nn.Module, Any], torch.Tensor]
#: targets with this value are not predictions (transformers' and torch's ignore index)
IGNORE = -100


def _forward(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    out = model(inputs)
    return getattr(out, "logits", out)


def fisher_diagonal(
    model: torch.nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor | None]],
    kind: Kind = "true",
    *,
    samples: int | None = 1,
    seed: int = 0,
    forward: Forward = _forward,
) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal Fisher of ``model``'s trainable parameters over ``batches``, and the number of predictions averaged.

    ``batches`` yields ``(inputs, targets)``: targets (one class per row of logits, ``-100``
    to skip a row) are needed for the empirical Fisher; for the true Fisher they only mark
    rows to skip (None: every row counts).  For a causal language model, pass the logits'
    rows aligned with their next tokens (``forward`` may shift them).
    """
    if kind not in ("true", "empirical"):
        raise ValueError(f"kind must be 'true' or 'empirical', not {kind!r}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            logits = forward(model, inputs)
            rows = logits.reshape(-1, logits.shape[-1])
            labels = targets.reshape(-1) if targets is not None else None
            if kind == "empirical" and labels is None:
                raise ValueError("the empirical Fisher needs the data's labels: give (inputs, targets) batches")
            for i in range(rows.shape[0]):
                if labels is not None and int(labels[i]) == IGNORE:
                    continue
                log_p = torch.log_softmax(rows[i].float(), dim=-1)
                for label, weight in _labels(kind, log_p, labels, i, samples, generator):
                    grads = torch.autograd.grad(log_p[label], list(params.values()), retain_graph=True, allow_unused=True)
                    for (name, _), g in zip(params.items(), grads):
                        if g is not None:
                            fisher[name].add_(g.float().square(), alpha=weight)
                count += 1
    finally:
        model.train(was_training)
    if count:
        for f in fisher.values():
            f.div_(count)
    return fisher, count


def _labels(kind: Kind, log_p: torch.Tensor, labels: torch.Tensor | None, i: int, samples: int | None,
            generator: torch.Generator) -> list[tuple[int, float]]:
    """The labels whose squared log-likelihood gradients make row ``i``'s Fisher, with their weights."""
    if kind == "empirical":
        return [(int(labels[i]), 1.0)]  # type: ignore[index]
    p = log_p.detach().exp()
    if samples is None:  # the exact expectation over the model's own distribution
        return [(c, float(p[c])) for c in range(p.numel()) if float(p[c]) > 0]
    drawn = torch.multinomial(p, samples, replacement=True, generator=generator)
    # a label drawn k times contributes k times the same square: one gradient, weighted k / samples
    counts = torch.bincount(drawn, minlength=p.numel())
    return [(int(c), int(counts[c]) / samples) for c in counts.nonzero().flatten()]


class EWC:
    """The EWC anchor of a training loop: Fisher, old parameters, λ; ``loss = task_loss + ewc.penalty(model)``."""

    def __init__(self, fisher: Mapping[str, torch.Tensor], old_params: Mapping[str, torch.Tensor], lam: float = 1000.0,
                 kind: Kind = "true", samples: int = 0) -> None:
        missing = sorted(set(fisher) ^ set(old_params))
        if missing:
            raise ValueError(f"fisher and old_params name different parameters: {missing[:5]}")
        self.fisher = {k: v.float() for k, v in fisher.items()}
        self.old_params = {k: v.detach().clone() for k, v in old_params.items()}
        self.lam, self.kind, self.samples = lam, kind, samples

    @classmethod
    def from_model(cls, model: torch.nn.Module, batches: Iterable[tuple[Any, torch.Tensor | None]], lam: float = 1000.0,
                   kind: Kind = "true", **fisher_options: Any) -> "EWC":
        """Take the Fisher of ``model`` over ``batches`` and anchor at its current parameters."""
        fisher, count = fisher_diagonal(model, batches, kind, **fisher_options)
        return cls(fisher, _params(model), lam, kind, count)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """``(λ / 2) Σ F (θ − θ*)²`` over the anchored parameters (new ones, from growth, are free)."""
        total = torch.zeros((), dtype=torch.float32)
        for name, param in model.named_parameters():
            if name not in self.fisher:
                continue
            if param.shape != self.old_params[name].shape:
                raise ValueError(f"parameter {name!r} is {list(param.shape)} but the EWC anchor is "
                                 f"{list(self.old_params[name].shape)}: take a new Fisher after growing")
            old = self.old_params[name].to(param.device, param.dtype)
            total = total + (self.fisher[name].to(param.device) * (param - old).square()).sum()
        return 0.5 * self.lam * total

    def update(self, model: torch.nn.Module, batches: Iterable[tuple[Any, torch.Tensor | None]], gamma: float = 1.0,
               **fisher_options: Any) -> None:
        """Online EWC: ``F ← γ F + F_new`` (F_new at the current parameters) and the anchor moves to them."""
        fresh, count = fisher_diagonal(model, batches, self.kind, **fisher_options)
        for name, f in fresh.items():
            old = self.fisher.get(name)
            self.fisher[name] = f if old is None or old.shape != f.shape else gamma * old + f
        self.old_params = _params(model)
        self.samples += count

    def save(self, folder: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({k: v.contiguous() for k, v in self.fisher.items()}, folder / "fisher.safetensors")
        save_file({k: v.contiguous() for k, v in self.old_params.items()}, folder / "old_params.safetensors")

    @classmethod
    def load(cls, folder: str | os.PathLike[str], lam: float = 1000.0, kind: Kind = "true", samples: int = 0) -> "EWC":
        from safetensors.torch import load_file

        folder = Path(folder)
        return cls(load_file(folder / "fisher.safetensors"), load_file(folder / "old_params.safetensors"), lam, kind, samples)

    @classmethod
    def from_checkpoint(cls, checkpoint: Any) -> "EWC":
        """The EWC anchor a ``.tprog`` saved (:class:`~statebridge_progressive.tprog.Checkpoint`)."""
        import statebridge as sb

        c = checkpoint.meta.ewc_config
        if c is None or not c.stored:
            raise sb.SourceError(checkpoint.path, "has no EWC anchor (ewc_config.stored is not true)")
        return cls.load(checkpoint.path / "ewc", c.lambda_, c.fisher, c.fisher_samples)

    def config(self, stored: bool) -> Any:
        from .tprog import EwcConfig

        return EwcConfig(enabled=True, lambda_=self.lam, fisher=self.kind, fisher_samples=self.samples, stored=stored)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
