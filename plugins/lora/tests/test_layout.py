"""lora_layout on a seed-style model (X.main_weight + X.lora_A/B) and the optimizer state carried across it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import statebridge as sb
from statebridge_lora.layout import LoraLayout
from statebridge_lora.optimizer import carry_optimizer_state


class LoRALinear(nn.Module):
    """The seed's layer: a frozen-able main Linear plus lora_B(lora_A(x)) · alpha/r."""

    def __init__(self, n_in: int, n_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.main_weight = nn.Linear(n_in, n_out)
        self.lora_A = nn.Linear(n_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, n_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main_weight(x) + self.lora_B(self.lora_A(x)) * self.scale


class Net(nn.Module):
    """Embedding, two layers (plain or LoRA-wrapped) and a head."""

    def __init__(self, rank: int = 0, alpha: float = 1.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        layer = (lambda i, o: LoRALinear(i, o, rank, alpha)) if rank else nn.Linear
        self.fc1, self.fc2 = layer(8, 12), layer(12, 8)
        self.head = nn.Linear(8, 16, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(ids))))))


IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = nn.functional.cross_entropy(model(IDS).flatten(0, 1), IDS.roll(1, 1).flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def convert(model: nn.Module, step: LoraLayout, tmp_path: Path, name: str) -> tuple[dict[str, torch.Tensor], sb.Plan]:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp_path / f"{name}.in.safetensors")
    built = sb.plan(tmp_path / f"{name}.in.safetensors", [step])
    sb.run(built, None, tmp_path / f"{name}.safetensors", progress=False)
    return load_file(tmp_path / f"{name}.safetensors"), built


def test_standard_to_lora_train_merge_standardize_round_trip_with_the_optimizer_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = Net()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    train_step(plain, opt)
    plain_names = [n for n, _ in plain.named_parameters()]

    # standard -> LoRA: loads strictly, computes exactly what the plain model did, optimizer state carried
    wrap = LoraLayout(direction="wrap", targets=["fc*.weight"], rank=2, seed=3)
    wrapped_sd, built = convert(plain, wrap, tmp_path, "wrapped")
    lora = Net(rank=2, alpha=4.0)
    lora.load_state_dict(wrapped_sd, strict=True)
    with torch.no_grad():
        assert torch.equal(lora(IDS), plain(IDS))
    bound = 1 / math.sqrt(8)  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    a = wrapped_sd["fc1.lora_A.weight"]
    assert a.abs().max() <= bound and a.std() > bound / 3 and wrapped_sd["fc1.lora_B.weight"].eq(0).all()
    lora_opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    carried = carry_optimizer_state(opt.state_dict(), plain_names, built, lora, lora_opt)
    assert set(carried.fresh) == {"fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight", "fc2.lora_B.weight"}
    assert "fc1.main_weight.weight" in carried.kept and not carried.dropped
    old = opt.state_dict()["state"][plain_names.index("fc1.weight")]["exp_avg"]
    new_names = [n for n, _ in lora.named_parameters()]
    assert torch.equal(lora_opt.state_dict()["state"][new_names.index("fc1.main_weight.weight")]["exp_avg"], old)

    # one LoRA training step (B leaves zero), then merge and standardize: the plain model computes the same
    train_step(lora, lora_opt)
    assert lora.fc1.lora_B.weight.abs().sum() > 0
    standard_sd, built = convert(lora, LoraLayout(direction="standardize", alpha=4.0), tmp_path, "standard")
    back = Net()
    back.load_state_dict(standard_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), lora(IDS), atol=1e-5, rtol=1e-5)
    back_opt = torch.optim.AdamW(back.parameters(), lr=1e-2)
    carried = carry_optimizer_state(lora_opt.state_dict(), new_names, built, back, back_opt)
    assert sorted(carried.kept) == sorted(plain_names) and not carried.fresh
    assert carried.dropped == {"fc1.lora_A.weight": "merged into fc1.weight", "fc1.lora_B.weight": "merged into fc1.weight",
                               "fc2.lora_A.weight": "merged into fc2.weight", "fc2.lora_B.weight": "merged into fc2.weight"}
    train_step(back, back_opt)  # the carried state is usable


def test_a_rank_change_is_standardize_then_wrap(tmp_path: Path) -> None:
    torch.manual_seed(1)
    lora = Net(rank=2, alpha=2.0)
    with torch.no_grad():
        for layer in (lora.fc1, lora.fc2):
            layer.lora_B.weight.normal_()
    steps = [LoraLayout(direction="standardize", alpha=2.0), LoraLayout(direction="wrap", targets=["fc*.weight"], rank=4)]
    save_file({k: v.detach().contiguous() for k, v in lora.state_dict().items()}, tmp_path / "in.safetensors")
    sb.run(tmp_path / "in.safetensors", steps, tmp_path / "out.safetensors", progress=False)
    wider = Net(rank=4, alpha=2.0)
    wider.load_state_dict(load_file(tmp_path / "out.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(wider(IDS), lora(IDS), atol=1e-5, rtol=1e-5)


def test_wrap_is_seeded_and_standardize_copies_plain_layers(tmp_path: Path) -> None:
    torch.manual_seed(2)
    plain = Net()
    one, _ = convert(plain, LoraLayout(direction="wrap", targets=["fc1.weight"], rank=2, seed=5), tmp_path, "one")
    two, _ = convert(plain, LoraLayout(direction="wrap", targets=["fc1.weight"], rank=2, seed=5), tmp_path, "two")
    other, _ = convert(plain, LoraLayout(direction="wrap", targets=["fc1.weight"], rank=2, seed=6), tmp_path, "other")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert not torch.equal(one["fc1.lora_A.weight"], other["fc1.lora_A.weight"])
    assert "fc2.weight" in one and "fc2.main_weight.weight" not in one
    # a main_weight without LoRA tensors is only renamed: its bytes are copied
    no_lora = {k: v for k, v in one.items() if "lora_" not in k}
    save_file(no_lora, tmp_path / "nolora.safetensors")
    report = sb.run(tmp_path / "nolora.safetensors", [LoraLayout(direction="standardize")], tmp_path / "s.safetensors", progress=False)
    assert report.stats.tensors_copied_raw == len(no_lora)


def test_layout_errors_name_the_keys(tmp_path: Path) -> None:
    state = {"fc.main_weight.weight": torch.zeros(4, 3), "fc.lora_A.weight": torch.zeros(2, 3), "fc.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(sb.PlanError, match="'fc.main_weight.weight' has LoRA tensors: give 'alpha'"):
        sb.plan(state, [LoraLayout(direction="standardize")])
    with pytest.raises(sb.PlanError, match="do not fit 'fc.main_weight.weight'"):
        sb.plan({**state, "fc.lora_B.weight": torch.zeros(5, 2)}, [LoraLayout(direction="standardize", alpha=1)])
    with pytest.raises(sb.PlanError, match="without a main_weight.weight beside them: x.lora_A.weight"):
        sb.plan({**state, "x.lora_A.weight": torch.zeros(2, 3)}, [LoraLayout(direction="standardize", alpha=1)])
    with pytest.raises(sb.ConfigError, match="wrap needs 'targets'"):
        LoraLayout(direction="wrap", rank=2)
