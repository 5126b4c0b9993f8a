"""Carrying an optimizer's state across a layout change: by parameter name (through the plan's lineage) and shape.

A torch optimizer's ``state_dict()`` indexes its state by position, so a model whose
parameters changed (LoRA tensors added or merged away, ``X.main_weight.weight`` renamed to
``X.weight``) cannot load the old one: ``load_state_dict`` fails on the group sizes, and
training code (the seed of issue 10) throws the whole state away.  Here each new parameter
finds its old one by name, through the lineage of the statebridge plan that converted the
weights (a renamed tensor's source; a merged weight's first source, its main weight), and
keeps the old state when every state tensor has the new parameter's shape.  Everything
else starts fresh, and the report lists what was kept, what was dropped and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import statebridge as sb

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class CarryReport:
    """What happened to each parameter's optimizer state."""

    kept: list[str] = field(default_factory=list)  # new names whose state came from the old optimizer
    fresh: list[str] = field(default_factory=list)  # new names with no old state (new LoRA tensors, ...)
    dropped: dict[str, str] = field(default_factory=dict)  # old name -> why its state was not carried

    def render(self) -> str:
        lines = [f"optimizer state: {len(self.kept)} kept, {len(self.fresh)} fresh, {len(self.dropped)} dropped"]
        lines += [f"  dropped {name}: {why}" for name, why in sorted(self.dropped.items())]
        return "\n".join(lines)


def carry_optimizer_state(
    old_state: Mapping[str, Any],
    old_names: Sequence[str],
    plan: sb.Plan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> CarryReport:
    """Load into ``optimizer`` (built for ``model``) the state of ``old_state`` for the parameters that remain.

    ``old_names`` names the old optimizer's parameters in its own order (the order of the
    ``params`` indices of its ``param_groups``, i.e. the order they were given to it);
    ``plan`` is the plan that turned the old checkpoint into ``model``'s.  The new
    optimizer's hyperparameters are kept; it never fails on a mismatch.
    """
    import torch

    indices = [i for group in old_state["param_groups"] for i in group["params"]]
    if len(indices) != len(old_names):
        raise sb.ConfigError(f"old_names has {len(old_names)} names for the old optimizer's {len(indices)} parameters")
    old_by_name = {name: old_state["state"].get(i) for name, i in zip(old_names, indices)}
    names = {id(p): n for n, p in model.named_parameters()}
    new = optimizer.state_dict()
    report = CarryReport()
    used: set[str] = set()
    position = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(id(param), "")
            lineage = plan.lineage.get(name)
            source = lineage.sources[0] if lineage is not None and lineage.sources else None
            state = old_by_name.get(source) if source is not None else None
            if state is None:
                report.fresh.append(name)
            else:
                used.add(source)
                bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape != param.shape]
                if bad:
                    report.dropped[source] = f"{bad[0]} is {list(state[bad[0]].shape)}, {name} is {list(param.shape)}"
                    report.fresh.append(name)
                else:
                    new["state"][position] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                    report.kept.append(name)
            position += 1
    merged_into = {s: n for n in names.values() if (lin := plan.lineage.get(n)) is not None for s in lin.sources[1:]}
    for name in old_names:
        if name not in used and name not in report.dropped:
            report.dropped[name] = (f"merged into {merged_into[name]}" if name in merged_into
                                    else "no parameter of the new model comes from it")
    optimizer.load_state_dict(new)
    return report
