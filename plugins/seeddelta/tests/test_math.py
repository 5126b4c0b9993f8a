"""The math of SeedΔ on small tensors: FWHT matvec, xor-circulant fits, residual schemes, the base rule, row scale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    """A column no input reaches, near-dead collinear ones, and K above the number of fit vectors
    (``G_SS`` singular without the floor): finite values, no worse on the fit set."""
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


#: solves one refit in a child process with two intra-op threads: argv ``IN OUT`` (safetensors)
_REFIT_ON_TWO_THREADS = (
    "import sys, torch\n"
    "from safetensors.torch import load_file, save_file\n"
    "from statebridge_seeddelta import residual\n"
    "torch.set_num_threads(2)\n"
    "t = load_file(sys.argv[1])\n"
    "res = residual.Residual('coo', 1, t['idx'], t['val'])\n"
    "residual.refit(res, t['w'], t['gram'], 0.0)\n"
    "save_file({'val': res.val}, sys.argv[2])\n"
    "print(torch.get_num_threads())\n"
)


def test_refit_solves_150_and_more_unknowns_on_two_threads(tmp_path: Path) -> None:
    """The strict Gemma build's ``ffn_down`` attempts at K = 192…384 came out non-finite (or the build
    died in ``lu_solve``): torch's batched LU on CPU with two threads gives bad pivots from 150
    unknowns on (MKL "Parameter 6 was incorrect on entry to SLASWP", then an error, a hang or wrong
    values). Here K = 160 on two threads must give the float64 solution of the documented system and
    leave the thread count as it was; the refit runs in a child process so that a hang fails by the
    timeout instead of stalling the suite."""
    torch.manual_seed(11)
    x = torch.randn(384, 192) @ torch.randn(192, 192) / 192 ** 0.5
    w = torch.randn(4, 192)
    res = residual.fit(w, x.square().mean(0), 160, "coo", 1)
    gram = x.T @ x
    save_file({"gram": gram, "w": w, "idx": res.idx, "val": res.val}, tmp_path / "in.safetensors")
    src = str(Path(residual.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _REFIT_ON_TWO_THREADS, str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "SLASWP" not in done.stderr, done.stderr[-400:]
    assert done.stdout.split() == ["2"]  # the caller's thread count is back
    got = load_file(tmp_path / "out.safetensors")["val"].double()
    g = gram.double()
    floor = 1e-3 * float(g.diagonal().mean())
    for i, s in enumerate(res.idx):
        want = torch.linalg.solve(g[s][:, s] + floor * torch.eye(160, dtype=torch.float64), (w[i].double() @ g)[s])
        assert float((got[i] - want).abs().max()) < 1e-2 * float(want.abs().max()), i


def test_refit_does_not_fit_noise_on_an_input_that_almost_never_fires() -> None:
    """An input at 1e-3 of the others' scale on the fit set gets whatever value fits that set's
    noise (tens to hundreds with the old floor, 1e-6·mean diag); where it then fires (held-out
    inputs), such values wreck the outputs. The floor keeps them small, and the refit still gains."""
    torch.manual_seed(5)
    mix = torch.randn(32, 32) / 32 ** 0.5
    x, held = torch.randn(256, 32) @ mix, torch.randn(256, 32) @ mix  # correlated: the refit has something to recover
    x[:, 3] = 1e-3 * torch.randn(256)
    w = torch.randn(4, 32)
    res = residual.fit(w, torch.ones(32), 16, "coo", 1)
    copied = res.dense(32)
    assert bool((res.row_index() == 3).any(dim=1).all())  # every row keeps input 3
    residual.refit(res, w, x.T @ x, ridge=0.0)
    fitted = res.dense(32)
    assert float(fitted[:, 3].abs().max()) < 1
    assert float((x @ (w - fitted).T).norm()) < 0.7 * float((x @ (w - copied).T).norm())
    assert float((held @ (w - fitted).T).norm()) < 0.95 * float((held @ (w - copied).T).norm())


def test_refit_keeps_copied_values_that_would_overflow_float16() -> None:
    """Inputs 0 and 1 are always equal and row 0 keeps only 0, so its solved value is the sum of the
    two weights, 80000: infinite in float16. That row keeps its copied values; row 1 is solved."""
    torch.manual_seed(1)
    x = torch.randn(32, 3)
    x[:, 1] = x[:, 0]
    w = torch.tensor([[40000.0, 40000.0, 1.0], [2.0, 2.0, 1.0]])
    res = residual.Residual("coo", 1, torch.tensor([[0, 2], [0, 2]]), w[:, [0, 2]].half().float())
    residual.refit(res, w, x.T @ x, ridge=0.0)
    assert res.val[0].tolist() == [40000.0, 1.0]
    assert res.val[1].tolist() == pytest.approx([4.0, 1.0], abs=1e-2)


def test_refit_keeps_copied_values_where_the_system_is_not_positive_definite() -> None:
    """A Gram matrix that is not one (``[[1, 2], [2, 1]]`` on row 0's support: an eigenvalue −1)
    fails its Cholesky factorization, whose solution is then finite garbage: that row keeps its copied
    values; row 1, whose support sees the positive part, is solved."""
    gram = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    w = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    res = residual.Residual("coo", 1, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    residual.refit(res, w, gram, ridge=0.0)
    assert res.val[0].tolist() == [0.5, 0.5]
    assert res.val[1].tolist() == pytest.approx([1.0, 1.0], abs=2e-3)
