"""The math of SeedΔ on small tensors: FWHT matvec, xor-circulant fits, residual schemes, the base rule, row scale."""

from __future__ import annotations

import pytest
import torch

from statebridge_seeddelta import fit as sdfit
from statebridge_seeddelta import lowrank, residual, xorc
from statebridge_seeddelta.fwht import fwht, permutation, signs


def hadamard(n: int) -> torch.Tensor:
    u = torch.arange(n)
    bits = (u.unsqueeze(1) & u.unsqueeze(0))
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.float()


def splitmix(seed: int, stream: int, i: int) -> int:
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + i) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_fwht_is_the_sylvester_hadamard_matrix() -> None:
    x = torch.randn(3, 64)
    assert torch.allclose(fwht(x), x @ hadamard(64), atol=1e-4)
    assert torch.allclose(fwht(fwht(x)) / 64, x, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))


def test_permutations_and_signs_are_fixed_by_the_seed() -> None:
    """A runtime elsewhere regenerates them from the seed: they must not depend on torch's generator."""
    p = permutation(7, 1, 10)
    assert sorted(p.tolist()) == list(range(10))
    assert p.tolist() == permutation(7, 1, 10).tolist() != permutation(8, 1, 10).tolist()
    assert p.tolist() == sorted(range(10), key=lambda i: splitmix(7, 1, i))  # the definition, in plain Python
    s = signs(7, 1000)
    assert set(s.tolist()) == {-1.0, 1.0} and 400 < (s > 0).sum() < 600


@pytest.mark.parametrize("shape", [(640, 2048), (96, 80), (300, 300)])
def test_fwht_matvec_equals_the_explicit_matrix(shape: tuple[int, int]) -> None:
    """Non-power-of-two sizes are padded/tiled; within 1e-5 relative in float32."""
    out, inp = shape
    torch.manual_seed(0)
    w, d = torch.randn(shape), torch.rand(inp) + 0.1
    terms, base = xorc.fit_stack(w, d, depth=2, trials=2, seed=3)
    explicit = xorc.dense(terms, out, inp)
    assert torch.allclose(explicit, base, atol=1e-5)
    x = torch.randn(7, inp)
    y = xorc.apply(terms, x, out)
    ref = (x.double() @ explicit.double().T).float()
    assert float((y - ref).norm() / ref.norm()) < 1e-5


def test_an_xor_circulant_matrix_is_recovered_exactly() -> None:
    n = 64
    c = torch.randn(1, 1, n).half().float()
    r = torch.randn(n).half().float()
    target = xorc.term_dense(xorc.XorTerm(11, c, r), n, n)
    term, gain = xorc.fit_term(target, torch.ones(n), 11, n)
    assert torch.allclose(xorc.term_dense(term, n, n), target, atol=1e-2 * float(target.abs().max()))
    assert gain == pytest.approx(float(target.square().sum()), rel=1e-3)


def _reduction(w: torch.Tensor, d: torch.Tensor, term: xorc.XorTerm) -> float:
    """``Σ d·(W² - (W - B)²)``: how much the term lowers the weighted error, from its dense matrix."""
    dense = xorc.term_dense(term, *w.shape)
    return float(((w.square() - (w - dense).square()) * d).sum())


def test_the_best_trial_is_kept_and_its_gain_is_the_weighted_error_reduction() -> None:
    """Trials are ranked by their coefficients' gain (every row scale 1); the kept one then gets its scales."""
    torch.manual_seed(1)
    w, d = torch.randn(128, 256), torch.rand(256) + 0.1
    fits = [xorc.fit_term(w, d, xorc.term_seed(5, 0, k), 128) for k in range(4)]
    for term, gain in fits:
        assert gain == pytest.approx(_reduction(w, d, term), rel=2e-3)
    unscaled = [_reduction(w, d, xorc.XorTerm(term.seed, term.c, torch.ones(128))) for term, _ in fits]
    assert len({round(g, 3) for g in unscaled}) == 4  # distinct, so the choice is meaningful
    terms, base = xorc.fit_stack(w, d, depth=1, trials=4, seed=5)
    best = max(range(4), key=lambda k: unscaled[k])
    assert terms[0].seed == fits[best][0].seed
    assert torch.equal(terms[0].r, fits[best][0].r)
    assert torch.allclose(base, xorc.term_dense(terms[0], 128, 256), atol=1e-6)


def test_coo_and_block_pick_by_importance_weighted_magnitude() -> None:
    r = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, 0.1, 0.2, 0.3]])
    d = torch.tensor([1.0, 0.01, 1.0, 100.0])
    coo = residual.fit(r, d, 2, "coo", 1)
    assert coo.idx.tolist() == [[2, 3], [0, 3]]  # 3.0 in a column of weight 0.01 loses to 0.5 in one of 100
    assert torch.equal(coo.val, r.gather(1, coo.idx).half().float())
    blk = residual.fit(r, d, 2, "block", 2)
    assert blk.idx.tolist() == [[0, 3]]  # summed over the block: col 0: 1+16, col 3: 25+9
    assert torch.equal(blk.dense(4), torch.tensor([[1.0, 0, 0, 0.5], [4.0, 0, 0, 0.3]]).half().float())
    assert residual.nbytes(2, 4, 2, "coo", 1) == 16 and residual.nbytes(2, 4, 2, "block", 2) == 8 + 4
    assert residual.k_for_bytes(16, 2, 4, "coo", 1) == 2


def test_refit_solves_the_values_on_the_activations() -> None:
    torch.manual_seed(2)
    x = torch.randn(400, 16) @ torch.randn(16, 16)  # correlated inputs
    w = torch.randn(4, 16)
    res = residual.fit(w, x.square().mean(0), 4, "coo", 1)
    before = float((x @ (w - res.dense(16)).T).norm())
    residual.refit(res, w, x.T @ x, ridge=0.0)
    after = float((x @ (w - res.dense(16)).T).norm())
    assert after < 0.9 * before


def test_lowrank_recovers_low_rank_plus_sparse() -> None:
    torch.manual_seed(3)
    low = torch.randn(64, 4) @ torch.randn(4, 96)
    sparse = torch.zeros(64, 96).scatter_(1, torch.randint(0, 96, (64, 2)), 5.0)
    u, v, res = lowrank.fit(low + sparse, torch.ones(96), 4, 2, "coo", 1, alternations=10, seed=0)
    err = (u @ v + res.dense(96)) - (low + sparse)
    assert float(err.norm() / (low + sparse).norm()) < 5e-3


def test_a_base_that_does_not_help_is_dropped_for_the_residual_at_equal_bytes() -> None:
    """On a sparse matrix no base helps: the fit falls back to the residual alone, and says why."""
    torch.manual_seed(4)
    w = torch.zeros(64, 128).scatter_(1, torch.randint(0, 128, (64, 8)), torch.randn(64, 8))
    x = torch.randn(256, 128)
    for base in ("xor_circulant", "lowrank"):
        f = sdfit.fit_tensor(w, x.square().mean(0), sdfit.FitSpec(K=8, base=base, row_scale=False, refit=False), x)
        assert f.base == "none" and f.base_check["kept"] is False
        assert f.base_check["cos_mean_x_w_fit_residual_only"] >= f.base_check["cos_mean_x_w_fit_with_base"]
        assert f.metrics["cos_mean_x_w"] == pytest.approx(1.0, abs=1e-3)


def test_a_base_that_helps_is_kept() -> None:
    """A low-rank matrix with a sparse part: the lowrank base earns its bytes."""
    torch.manual_seed(5)
    w = torch.randn(128, 4) @ torch.randn(4, 256) + torch.randn(128, 256) * 0.05
    x = torch.randn(512, 256)
    f = sdfit.fit_tensor(w, x.square().mean(0), sdfit.FitSpec(K=32, base="lowrank"), x)
    assert f.base == "lowrank" and f.base_check["kept"] and f.rank > 0
    assert f.metrics["cos_mean_x_w"] > f.topk_same_bytes["metrics"]["cos_mean_x_w"] + 0.1
    assert f.nbytes() <= f.topk_same_bytes["bytes"] + residual.nbytes(128, 256, 1, "coo", 1)


def test_row_scale_brings_the_norm_ratio_to_one() -> None:
    torch.manual_seed(6)
    w, x = torch.randn(96, 256), torch.randn(512, 256)
    d = x.square().mean(0)
    plain = sdfit.fit_tensor(w, d, sdfit.FitSpec(K=32, base="none", row_scale=False, refit=False), x)
    scaled = sdfit.fit_tensor(w, d, sdfit.FitSpec(K=32, base="none", row_scale=True, refit=False), x)
    assert plain.metrics["norm_ratio_x_w"] < 0.8
    assert scaled.metrics["norm_ratio_x_w"] == pytest.approx(1.0, abs=0.01)
    assert scaled.metrics["cos_mean_x_w"] >= plain.metrics["cos_mean_x_w"] - 1e-3
    assert scaled.nbytes() == plain.nbytes() + 2 * 96


def test_fits_are_deterministic() -> None:
    torch.manual_seed(7)
    w, x = torch.randn(64, 128), torch.randn(128, 128)
    a, b = (sdfit.fit_tensor(w, x.square().mean(0), sdfit.FitSpec(K=8, base="lowrank"), x) for _ in range(2))
    assert torch.equal(a.approx(), b.approx()) and a.metrics == b.metrics


@pytest.mark.parametrize("base", ["none", "lowrank", "xor_circulant"])
def test_weight_metrics_from_the_parts_equal_the_dense_ones(base: str) -> None:
    from statebridge_seeddelta import metrics

    torch.manual_seed(8)
    w = torch.randn(96, 4) @ torch.randn(4, 160) + 0.3 * torch.randn(96, 160)
    if base == "xor_circulant":  # a weight the base fits, so that it is kept
        term = xorc.XorTerm(xorc.term_seed(0, 0, 0), torch.randn(2, 3, 64), torch.rand(96) + 0.5)
        w = xorc.term_dense(term, 96, 160) + 0.1 * torch.randn(96, 160)
    x = torch.randn(300, 160)
    f = sdfit.fit_tensor(w, x.square().mean(0), sdfit.FitSpec(K=24, base=base, scheme="block", block=8), x)
    assert f.base == base
    dense = metrics.weight_metrics(w, f.approx())
    for key, value in f.weight_metrics(w).items():
        assert value == pytest.approx(dense[key], abs=1e-5), key
    assert torch.allclose(f.outputs(x), x @ f.approx().T, atol=1e-4)


def test_refit_survives_dead_inputs_and_more_entries_than_samples() -> None:
    """Near-dead, collinear inputs and K above the number of fit vectors (as in Gemma's ffn_down at
    K=384): the values stay finite in float16, where a bare solve gave values beyond its range."""
    torch.manual_seed(9)
    x = torch.randn(20, 64)
    x[:, 5] = 0.0
    x[:, 6] = 1e-4 * torch.randn(20)
    x[:, 7] = x[:, 6] + 1e-9 * torch.randn(20)
    w = torch.randn(8, 64)
    res = residual.fit(w, torch.ones(64), 40, "coo", 1)
    before = float((x @ (w - res.dense(64)).T).norm())
    residual.refit(res, w, x.T @ x, ridge=0.0)
    assert torch.isfinite(res.val).all() and float(res.val.abs().max()) < 100
    assert float((x @ (w - res.dense(64)).T).norm()) <= before


def test_a_fit_is_the_same_at_any_thread_count_and_leaves_the_setting_alone() -> None:
    """BLAS splits the low-rank base's thin products by thread count; a fit pins one thread, then restores it."""
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(128, 4, generator=gen) @ torch.randn(4, 64, generator=gen) + 0.3 * torch.randn(128, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    fits = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fits.append(sdfit.fit_tensor(w, x.square().mean(0), sdfit.FitSpec(K=8, base="lowrank"), x))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert fits[0].base == "lowrank" and torch.equal(fits[0].approx(), fits[1].approx())
