"""``statebridge seeddelta build``: policy → fit with autotune → gates → decision → one atomic GGUF, and the report.

Per FFN weight, in layer order: resolve its settings (:mod:`.policy`); if enabled, fit at
each ``K`` of the autotune schedule (or at ``K`` alone) until every gate accepts (:mod:`.gating`);
the first passing attempt is emitted, and its dense weight stripped if the policy says
``strip``; when none passes the weight stays dense, is listed in ``seeddelta.unsafe`` and its
best attempt is kept in the report for diagnosis. Then the output is written through a
statebridge plan (:class:`.emit.SeedDeltaEmit`) whose shapes are now known: the model's
tensors and key-values plus the SeedΔ tensors and ``seeddelta.*`` fields, or with
``sidecar`` the SeedΔ tensors alone in their own GGUF (``general.type = "seeddelta"``), so
llama.cpp loads the untouched model. The target appears only when complete.

Tensors are fitted in ``jobs`` worker processes when asked, and under ``torchrun`` shared
over its ranks (:func:`statebridge.execute.distributed.session`, as ``statebridge run``
does): each rank fits a contiguous share of the weights (``jobs`` workers each), the ranks
gather every rank's report entries and SeedΔ tensors, and rank 0 alone writes the target.
Each weight's fit and gate decisions depend on its own inputs alone, and results are
assembled in weight order, so the bytes are the same as a sequential run's however the work
was split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import statebridge as sb
from statebridge.execute.distributed import Ranks, session

from . import fit as sdfit
from . import gating, names, storage
from .importance import Activations, read_imatrix
from .policy import Policy, Resolved

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"


@dataclasses.dataclass
class Inputs:
    """Where importance and activations come from (paths; opened in each worker)."""

    activations: str | None = None
    imatrix: str | None = None
    eval_x: str | None = None
    extra_gates: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Attempt:
    """One fit at one K, as the gates see it (``metrics``, ``gating``)."""

    fit: sdfit.Fit
    gating: Any
    metrics: dict[str, float]


def targets(model: str, layers: set[int] | None, kinds: set[str] | None) -> tuple[list[str], dict[str, Any]]:
    """The FFN weights of ``model`` to consider, in (layer, type) order, and the model's metas."""
    with sb.open_source(model) as src:
        metas = dict(src.metas())
    found = []
    for key, meta in metas.items():
        where = names.classify(key)
        if where is None or len(meta.shape) != 2:
            continue
        if (layers is None or where[0] in layers) and (kinds is None or where[1] in kinds):
            found.append((where[0], names.TENSOR_TYPES.index(where[1]), key))
    return [k for _, _, k in sorted(found)], metas


def _importance(weight: str, inp: int, inputs: Inputs, imatrix: dict[str, torch.Tensor] | None) -> tuple[Any, Any, Any, str]:
    """``(d, x_fit, x_eval, kind)``; kind says where the fit inputs came from."""
    x_fit = Activations(inputs.activations).get(weight, inp) if inputs.activations else None
    x_eval = Activations(inputs.eval_x).get(weight, inp) if inputs.eval_x else None
    if x_fit is not None:
        return x_fit.square().mean(0), x_fit, x_eval, "activations"
    d = None
    for alias in names.aliases(weight):
        if imatrix and alias in imatrix:
            d = imatrix[alias]
    if d is not None:
        if d.numel() != inp:
            raise sb.SourceError(inputs.imatrix, f"{weight} has {d.numel()} importances for {inp} inputs")
        return d, sdfit.synthetic_inputs(d), x_eval, "imatrix (Gaussian samples with its variances)"
    if x_eval is not None:
        return x_eval.square().mean(0), x_eval, x_eval, "eval-x (no fit activations: fitted on the evaluation set)"
    return None, None, None, "none"


def fit_weight(model: str, weight: str, resolved: Resolved, inputs: Inputs) -> tuple[dict[str, Any], sdfit.Fit | None]:
    """All attempts on one weight: its report entry and the fit to emit (None: stays dense)."""
    from statebridge.plugins import installed
    from statebridge.trust.gates import Gates

    with sb.open_source(model) as src:
        w = src.load(weight).float().clone()
    out, inp = w.shape
    imatrix = read_imatrix(inputs.imatrix) if inputs.imatrix else None
    d, x_fit, x_eval, kind = _importance(weight, inp, inputs, imatrix)
    entry: dict[str, Any] = {"weight": weight, "shape": [out, inp], "resolved": resolved.report(), "inputs": kind,
                             "evaluated_on": "held-out (--eval-x)" if x_eval is not None else "the fit inputs"}
    if d is None:
        entry["decision"] = {"emit_delta": False, "strip_applied": False,
                             "reason": "no activations or imatrix entry for this weight"}
        return entry, None
    gates = Gates(installed().gates, {gating.NAME: True, **inputs.extra_gates})
    schedule = resolved.autotune.schedule[: resolved.autotune.max_iters] if resolved.autotune.enabled else [resolved.spec.K]
    cache: dict[str, Any] = {}
    attempts, chosen, best = [], None, None
    for k in schedule:
        spec = dataclasses.replace(resolved.spec, K=min(k, inp))
        fitted = sdfit.fit_tensor(w, d, spec, x_fit, x_eval, cache=cache)
        attempt = Attempt(fitted, resolved.gating, fitted.metrics)
        candidate = fitted.approx()
        votes = []
        for name, gate, setting in gates.active:
            decision = gate(weight, candidate, {weight: w}, attempt, setting)
            if decision is not None:
                votes.append({"gate": name, "accept": decision.accept, "reason": decision.reason,
                              "metrics": dict(decision.metrics)})
        passed = all(v["accept"] for v in votes)
        attempts.append({"K": spec.K, "base": fitted.base, "bytes": fitted.nbytes(), "metrics": fitted.metrics,
                         "topk_same_bytes": fitted.topk_same_bytes["metrics"], "pass": passed, "votes": votes,
                         "seconds": round(fitted.seconds, 3)})
        primary = gating.picked(fitted.metrics, resolved.gating.metric)["mean"] or -1.0
        if best is None or primary > best[0]:
            best = (primary, fitted, votes)
        if passed:
            chosen = (fitted, votes)
            break
        del candidate
    assert best is not None
    final, votes = (chosen if chosen is not None else best[1:])
    entry["autotune"] = {"enabled": resolved.autotune.enabled, "schedule": schedule, "attempts": attempts}
    entry["gating"] = {"metric": resolved.gating.metric, "thresholds": resolved.gating.model_dump(),
                       "pass": chosen is not None, "picked": gating.picked(final.metrics, resolved.gating.metric),
                       "votes": votes}
    summary = final.summary()
    entry["fit"] = {k: v for k, v in summary.items() if k not in ("metrics", "topk_same_bytes")}
    entry["metrics"], entry["topk_same_bytes"] = final.metrics, final.topk_same_bytes
    if chosen is None:
        entry["decision"] = {"emit_delta": False, "strip_applied": False,
                             "reason": f"failed gating at every K tried ({schedule}); stays dense, marked unsafe"}
        return entry, None
    entry["decision"] = {"emit_delta": True, "strip_applied": resolved.strip,
                         "reason": f"passed gating at K={attempts[-1]['K']}"
                         + (f" (residual K={final.K} beside the {final.base} base)" if final.base != "none" else "")
                         + ("; dense stripped" if resolved.strip else "")}
    return entry, final


#: one weight's result: its report entry, its SeedΔ tensors and its storage entries (Nones: it stays dense)
Result = tuple[dict[str, Any], dict[str, Any] | None, list | None]
Job = tuple[str, str, Resolved, Inputs]


def _work(job: Job) -> Result:
    """A worker's task: fit one weight; its report entry, its SeedΔ tensors and storage entry (or Nones)."""
    model, weight, resolved, inputs = job
    entry, fitted = fit_weight(model, weight, resolved, inputs)
    if fitted is None:
        return entry, None, None
    return entry, storage.fit_tensors(weight, fitted), [storage.Entry.of(weight, fitted, resolved.strip)]


def build(
    model: str,
    out: str | None,
    *,
    policy: Policy | str | None,
    inputs: Inputs,
    layers: set[int] | None = None,
    kinds: set[str] | None = None,
    sidecar: bool = False,
    overwrite: bool = False,
    jobs: int = 1,
    distributed: bool | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit, gate, decide, write; returns the report (see docs/seeddelta.md for its fields).

    ``policy``: a :class:`.policy.Policy`, or the path of its JSON file (None: the built-in defaults), read
    inside the build, so that in a distributed build a file one rank cannot read is reported as that rank's
    failure on every rank. ``progress`` receives one line per weight as its fit finishes (the command line
    prints them on stderr).

    ``distributed`` is :class:`statebridge.options.RunOptions`' option of that name: ``None``
    (auto) shares the weights over the ranks when ``torchrun`` started this process, ``True``
    also over a process group the caller initialised, ``False`` fits in this process alone.
    In a distributed build every rank calls this with the same arguments and returns the same
    report once rank 0 has written ``out``; only rank 0 calls ``progress``. A failure on any
    rank raises :class:`statebridge.ExecutionError` on every rank, in the same words
    (``rank 1 of 2 failed: SourceError: ...``), and leaves no target.
    """
    with session(distributed) as ranks:
        (weights, metas, jobs_list, report, loaded), offers = _together(ranks, lambda: _prepare(
            model, out, policy, inputs, layers, kinds, sidecar, overwrite, dry_run))
        if ranks is not None:
            for what in offers[0]:
                ranks.require_same([offer[what] for offer in offers], what)
        if dry_run:
            report["summary"] = {"dry_run": True, "would_fit": len(jobs_list) or sum(
                1 for L in report["layers"].values() for t in L["tensors"].values() if "would_fit" in t)}
            return report
        start = time.perf_counter()
        if ranks is None:
            results = _fit_all(jobs_list, jobs, progress)
        else:
            results = _fit_shared(ranks, jobs_list, jobs, progress,
                                  [metas[job[1]].numel * _attempts(job[2]) for job in jobs_list])

        def finish() -> tuple[None, None]:
            tensors, kv, strip = _assemble(report, weights, jobs_list, results, loaded.hash, start)
            if out is not None and (ranks is None or ranks.rank == 0):
                _write(model, out, tensors, kv, strip, sidecar=sidecar, overwrite=overwrite)
            return None, None

        _together(ranks, finish)  # every rank returns once rank 0 has committed, or raises its failure
    return report


T = TypeVar("T")


def _together(ranks: Ranks | None, part: Callable[[], tuple[T, Any]]) -> tuple[T, list[Any]]:
    """Run this rank's ``part`` (what it keeps, what it sends), then meet the other ranks: what it keeps, and what
    each rank sent, in rank order.

    Every rank reaches the exchange, having failed or not, so no rank waits for ever on one that gave up. A
    failure on some ranks raises :class:`statebridge.ExecutionError` on every rank, in the same words, naming
    them (``rank 1 of 2 failed: SourceError: ...``); one that every rank met alike (a malformed policy, a
    missing model) is the build's own and is raised as it is.
    """
    try:
        kept, sent = part()
        failure: Exception | None = None
    except Exception as e:
        if ranks is None:
            raise
        kept, sent, failure = None, None, e  # type: ignore[assignment]
    if ranks is None:
        return kept, [sent]
    outcomes = ranks.sync((sent, None if failure is None else f"{type(failure).__name__}: {failure}"))
    failed = [(rank, error) for rank, (_, error) in enumerate(outcomes) if error is not None]
    if failure is not None and len(failed) == ranks.world and len({error for _, error in failed}) == 1:
        raise failure
    if failed:
        raise sb.ExecutionError("; ".join(f"rank {rank} of {ranks.world} failed: {error}" for rank, error in failed))
    return kept, [payload for payload, _ in outcomes]


def _prepare(model: str, out: str | None, policy: Policy | str | None, inputs: Inputs, layers: set[int] | None,
             kinds: set[str] | None, sidecar: bool, overwrite: bool, dry_run: bool) -> tuple[
                 tuple[list[str], dict[str, Any], list[Job], dict[str, Any], Policy], dict[str, Any]]:
    """The selected weights, the model's metas, the weights to fit, the report so far (its header, the
    weights the policy disables, and in a dry run what would be fitted) and the policy; and what the ranks
    of a distributed build must have in common: ranks given different models, targets, policies or inputs
    would otherwise write one rank's fits under another's settings."""
    from statebridge.plugins import installed
    from statebridge.trust.gates import Gates

    if not isinstance(policy, Policy):
        policy = Policy.load(policy)
    Gates(installed().gates, {gating.NAME: True, **inputs.extra_gates})  # an unknown gate name fails now, before any fit
    weights, metas = targets(model, layers, kinds)
    if not weights:
        raise sb.ConfigError(f"{model}: no FFN weight (blk.N.ffn_gate/up/down.weight or "
                             "model.layers.N.mlp.*_proj.weight) matches the selection")
    report: dict[str, Any] = {
        "build": {"model": str(model), "output": out, "mode": "sidecar" if sidecar else "model",
                  "policy_file": policy.source, "policy_hash": policy.hash, "policy_version": policy.version,
                  "format_version": storage.FORMAT_VERSION, "plugin_version": __version__,
                  "activations": inputs.activations, "imatrix": inputs.imatrix, "eval_x": inputs.eval_x,
                  "gates": [gating.NAME, *inputs.extra_gates]},
        "layers": {},
    }
    jobs_list: list[Job] = []
    for weight in weights:
        layer, kind = names.classify(weight)  # type: ignore[misc]
        resolved = policy.resolve(layer, kind)
        if not resolved.enable:
            _place(report, weight, {"weight": weight, "resolved": resolved.report(), "decision": {
                "emit_delta": False, "strip_applied": False, "reason": "disabled by the policy"}})
        elif dry_run:
            spec = resolved.spec
            ks = resolved.autotune.schedule[: resolved.autotune.max_iters] if resolved.autotune.enabled else [spec.K]
            _place(report, weight, {"weight": weight, "shape": list(metas[weight].shape), "resolved": resolved.report(),
                                    "would_fit": {"base": spec.base, "scheme": spec.scheme, "K": ks}})
        else:
            jobs_list.append((model, weight, resolved, inputs))
    agree = {"models": _identity(model), "outputs": (_identity(out), sidecar, overwrite), "policies": policy.hash,
             "inputs": ([_identity(path) for path in (inputs.activations, inputs.imatrix, inputs.eval_x)],
                        json.dumps(inputs.extra_gates, sort_keys=True, default=repr))}
    return (weights, metas, jobs_list, report, policy), agree


def _attempts(resolved: Resolved) -> int:
    """How many fits a weight may take (its share of the work scales with them)."""
    return min(len(resolved.autotune.schedule), resolved.autotune.max_iters) if resolved.autotune.enabled else 1


def _identity(path: str | None) -> tuple[str, int, int] | None:
    """Real path, size and modification time of a file or folder (None when absent): what ranks can compare."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (os.path.realpath(path), -1, -1)  # missing: the fit names it, on every rank alike
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _line(i: int, n: int, entry: dict[str, Any]) -> str:
    return f"[{i + 1}/{n}] {entry['weight']}: {entry['decision']['reason']}"


def _fit_all(jobs_list: list[Job], jobs: int, progress: Callable[[str], None] | None, first: int = 0,
             total: int | None = None) -> list[Result]:
    """Fit these weights in this process or in ``jobs`` workers, in order; a progress line per weight (numbered
    ``first + 1`` onwards of ``total``)."""
    total = len(jobs_list) if total is None else total
    results = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_spawn()) if jobs > 1 and len(jobs_list) > 1 else \
            contextlib.nullcontext() as pool:
        for i, result in enumerate(pool.map(_work, jobs_list) if pool is not None else map(_work, jobs_list)):
            results.append(result)
            if progress is not None:
                progress(_line(first + i, total, result[0]))
    return results


def _fit_shared(ranks: Ranks, jobs_list: list[Job], jobs: int, progress: Callable[[str], None] | None,
                work: list[int]) -> list[Result]:
    """Every rank's results, in weight order: this rank fits its contiguous share (balanced by ``work``), then
    the ranks exchange them. Rank 0 prints its own share's lines as they come and the others' once gathered, so
    the lines are a sequential run's."""
    share = ranks.share(work)
    _, parts = _together(ranks, lambda: (None, _fit_all(
        [jobs_list[i] for i in share], jobs, progress if ranks.rank == 0 else None, share.start, len(jobs_list))))
    results = [result for part in parts for result in part]
    if progress is not None and ranks.rank == 0:
        for i in range(len(parts[0]), len(results)):
            progress(_line(i, len(results), results[i][0]))
    return results


def _assemble(report: dict[str, Any], weights: list[str], jobs_list: list[Job], results: list[Result],
              policy_hash: str, start: float) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Place each result in the report, in weight order, and add the summary; the tensors, key-values and
    stripped weights to write."""
    tensors: dict[str, Any] = {}
    entries: list[storage.Entry] = []
    unsafe = []
    for (_, weight, _, _), (entry, fitted, stored) in zip(jobs_list, results):
        _place(report, weight, entry)
        if fitted is None:
            if "gating" in entry:
                unsafe.append(weight)
            continue
        tensors.update(fitted)
        entries.extend(stored or [])
    kv = storage.key_values(entries, policy_hash=policy_hash, unsafe=unsafe)
    strip = [e.weight for e in entries if e.stripped]
    dense_bytes = sum(2 * e.in_features * e.out_features for e in entries)
    sd_bytes = sum(int(t.numel() * t.element_size()) for t in tensors.values())
    report["summary"] = {
        "weights": len(weights), "fitted": len(jobs_list), "emitted": len(entries), "stripped": len(strip),
        "unsafe": unsafe, "seeddelta_bytes": sd_bytes, "dense_f16_bytes_replaced": dense_bytes,
        "bytes_saved_vs_f16_where_stripped": sum(2 * e.in_features * e.out_features for e in entries if e.stripped)
        - sum(int(t.numel() * t.element_size()) for k, t in tensors.items()
              if any(k.startswith(w.removesuffix(".weight") + ".sd_") for w in strip)),
        "fit_seconds": round(time.perf_counter() - start, 3),
    }
    return tensors, kv, strip


def _spawn():  # noqa: ANN202
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _place(report: dict[str, Any], weight: str, entry: dict[str, Any]) -> None:
    layer, kind = names.classify(weight)  # type: ignore[misc]
    report["layers"].setdefault(str(layer), {"tensors": {}})["tensors"][kind] = entry


def _write(model: str, out: str, tensors: dict[str, Any], kv: dict[str, Any], strip: list[str], *, sidecar: bool,
           overwrite: bool) -> None:
    """Stage the SeedΔ tensors, then one atomic statebridge run into ``out``.

    The run is this process's alone (``distributed=False``), even under torchrun: in a distributed build rank 0
    writes what every rank fitted, and a GGUF target cannot be shared by several writers anyway.
    """
    from safetensors.torch import save

    from .emit import SeedDeltaEmit

    target = Path(out)
    ordered = dict(sorted(tensors.items()))
    blob = save(ordered)
    # The staged file's path is a parameter of the step, hence part of the run's fingerprint (written into
    # the file): name it by its content, so the same fits give the same bytes wherever and however they ran.
    staged = Path(tempfile.gettempdir()) / f"seeddelta-{hashlib.sha256(blob).hexdigest()[:32]}.safetensors"
    created = not staged.exists()
    if created:
        partial = staged.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(blob)
        os.replace(partial, staged)
    del blob
    try:
        try:
            if sidecar:
                if not tensors:
                    raise sb.ConfigError("sidecar: no tensor passed gating, so there is nothing to write")
                sb.run(str(staged), [], target, format="gguf", overwrite=overwrite, progress=False,
                       metadata={**kv, "general.type": "seeddelta"}, distributed=False)
            else:
                step = SeedDeltaEmit(tensors=str(staged), strip=strip)
                sb.run(model, [step], target, format="gguf", overwrite=overwrite, progress=False, metadata=kv,
                       distributed=False)
        except sb.SourceError as e:
            raise sb.ExecutionError(str(e)) from None
    finally:
        if created:
            staged.unlink(missing_ok=True)
