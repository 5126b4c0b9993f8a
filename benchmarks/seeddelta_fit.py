"""SeedΔ fit cost at Qwen2.5-7B FFN size: one 3584 × 18944 tensor, K=256, block=32, 2 threads.

Each case runs ``--repeat`` times (default 3; median and range of the seconds, the largest
peak RSS) in a fresh interpreter (its peak RSS, VmHWM, is its own) on the same seeded
synthetic weight (Gaussian rows with log-normal column scales, as FFN weights have outlier
columns) and 512 synthetic activation vectors (Gaussian, log-normal column variances):

- ``topk``: plain top-K residual alone (block scheme);
- ``xor_attempt``: one whole ``fit_tensor`` attempt with a 2-term × 4-trial ``xor_circulant`` base:
  the stack, the residual, the residual-only comparison at equal bytes, the row scale, every
  metric and top-K beside it (``refit`` is off: the 18944² Gram matrix is over its 8192 limit);
- ``lowrank_attempt``: the same with the ``lowrank`` base, 10 alternations;
- ``metrics``: all metrics of a fitted tensor over the 512 vectors, given the dense outputs
  (computed once per tensor and shared by its attempts), and ``dense_outputs``: those outputs.

The interpreter allows torch 2 threads; a fit (``fit_tensor``) runs on one by design (its bytes
must not depend on the thread count; tensors are the unit of parallel work), the metrics on 2.

Targets (issue 13): xor attempt ≤ 10 s and ≤ 2 GB; lowrank ≤ 15 s; metrics ≤ 1.5 s.

    .venv/bin/python benchmarks/seeddelta_fit.py [--only metrics xor_attempt]
"""

from __future__ import annotations

import json
import subprocess
import sys

OUT, IN, K, BLOCK, N = 3584, 18944, 256, 32, 512

CASE = r"""
import json, time, torch
torch.set_num_threads(2)
from statebridge_seeddelta import fit as sdfit, metrics, residual
g = torch.Generator().manual_seed(0)
w = torch.randn({OUT}, {IN}, generator=g) * torch.exp(0.5 * torch.randn({IN}, generator=g))
x = torch.randn({N}, {IN}, generator=g) * torch.exp(0.5 * torch.randn({IN}, generator=g))
d = x.square().mean(0)
case = "{case}"
result = {{}}
if case == "topk":
    t = time.perf_counter(); residual.fit(w, d, {K}, "block", {BLOCK}); result["seconds"] = time.perf_counter() - t
elif case in ("xor_attempt", "lowrank_attempt"):
    base = "xor_circulant" if case == "xor_attempt" else "lowrank"
    spec = sdfit.FitSpec(K={K}, base=base, scheme="block", block={BLOCK}, depth=2, perm_trials=4, alternations=10)
    t = time.perf_counter(); f = sdfit.fit_tensor(w, d, spec, x); result["seconds"] = time.perf_counter() - t
    result.update(kept=f.base_check.get("kept"), cos=f.metrics["cos_mean_x_w"], topk=f.topk_same_bytes["metrics"]["cos_mean_x_w"])
elif case == "metrics":
    f = sdfit.Fit((w.shape[0], w.shape[1]), sdfit.FitSpec(K={K}), "none", residual.fit(w, d, {K}, "block", {BLOCK}))
    t = time.perf_counter(); y = metrics.outputs(x, w); result["dense_outputs_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    m = {{**f.weight_metrics(w), **metrics.output_metrics(y, f.outputs(x))}}
    result["seconds"] = time.perf_counter() - t
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        result["peak_rss_mb"] = int(line.split()[1]) / 1024
print(json.dumps(result))
"""


def main() -> None:
    import argparse
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["topk", "metrics", "xor_attempt", "lowrank_attempt"])
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs per case (median and range reported)")
    args = parser.parse_args()
    results = {}
    for case in args.only:
        code = CASE.format(OUT=OUT, IN=IN, K=K, BLOCK=BLOCK, N=N, case=case)
        runs = []
        for _ in range(args.repeat):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"{case} failed")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        seconds = [r["seconds"] for r in runs]
        results[case] = {**runs[0], "seconds": statistics.median(seconds), "seconds_range": [min(seconds), max(seconds)],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": len(runs)}
        print(case, results[case], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
