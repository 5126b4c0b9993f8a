"""EWC: the Fisher of softmax regression against its closed form; the penalty's convention; online accumulation."""

from __future__ import annotations

import pytest
import torch

from statebridge_progressive.ewc import EWC, fisher_diagonal


@pytest.fixture()
def regression() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    return model, x, y


def closed_form(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """d log p_y / d logits = onehot(y) - p; true: E_y~p of its square, i.e. p(1-p)... per class (diagonal)."""
    p = torch.softmax(model(x).double(), dim=-1).detach()
    if kind == "true":
        # E_y~p[(1[c=y] - p_c)^2] = p_c (1 - p_c)^2 + (1 - p_c) p_c^2 = p_c (1 - p_c)
        d2 = p * (1 - p)
    else:
        d2 = (torch.nn.functional.one_hot(y, 4).double() - p).square()
    weight = (d2[:, :, None] * x.square()[:, None, :]).mean(0)
    return weight, d2.mean(0)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_softmax_regression_fisher_matches_the_closed_form(regression, kind: str) -> None:
    model, x, y = regression
    fisher, count = fisher_diagonal(model, [(x[:10], y[:10]), (x[10:], y[10:])], kind, samples=None)
    weight, bias = closed_form(model, x, y, kind)
    assert count == 30
    assert float((fisher["weight"].double() - weight).abs().max()) <= 1e-6
    assert float((fisher["bias"].double() - bias).abs().max()) <= 1e-6


def test_true_and_empirical_differ_and_sampling_estimates_the_true_one(regression) -> None:
    model, x, y = regression
    true, _ = fisher_diagonal(model, [(x, y)], "true", samples=None)
    empirical, _ = fisher_diagonal(model, [(x, y)], "empirical")
    sampled, _ = fisher_diagonal(model, [(x, y)], "true", samples=400, seed=1)
    assert float((true["weight"] - empirical["weight"]).abs().max()) > 0.05
    assert float((sampled["weight"] - true["weight"]).abs().max()) < 0.25 * float(true["weight"].abs().max())


def test_penalty_is_zero_at_the_anchor_and_half_lambda_f_d2_elsewhere(regression) -> None:
    model, x, y = regression
    ewc = EWC.from_model(model, [(x, y)], lam=10.0, kind="empirical")
    assert float(ewc.penalty(model).detach()) == 0.0
    with torch.no_grad():
        model.weight[1, 2] += 0.5
    expected = 0.5 * 10.0 * float(ewc.fisher["weight"][1, 2]) * 0.25
    assert float(ewc.penalty(model).detach()) == pytest.approx(expected, rel=1e-6)
    ewc.penalty(model).backward()
    assert float(model.weight.grad[1, 2]) == pytest.approx(10.0 * float(ewc.fisher["weight"][1, 2]) * 0.5, rel=1e-6)


def test_online_update_accumulates_and_moves_the_anchor(regression) -> None:
    model, x, y = regression
    ewc = EWC.from_model(model, [(x, y)], kind="empirical")
    first = ewc.fisher["weight"].clone()
    with torch.no_grad():
        model.weight += 0.1
    ewc.update(model, [(x, y)], gamma=0.5, samples=None)
    fresh, _ = fisher_diagonal(model, [(x, y)], "empirical")
    torch.testing.assert_close(ewc.fisher["weight"], 0.5 * first + fresh["weight"])
    assert float(ewc.penalty(model).detach()) == 0.0 and ewc.samples == 60


def test_a_grown_parameter_is_named(regression) -> None:
    model, x, y = regression
    ewc = EWC.from_model(model, [(x, y)], kind="empirical")
    wider = torch.nn.Linear(6, 4).double()
    with pytest.raises(ValueError, match="parameter 'weight' is \\[4, 6\\] but the EWC anchor is \\[4, 5\\]"):
        ewc.penalty(wider)
