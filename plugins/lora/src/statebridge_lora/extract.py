"""``lora_extract``: a PEFT LoRA adapter from the difference of two checkpoints, by SVD in float32.

The step runs on the *tuned* checkpoint and reads the base's tensors itself (``base``).
Every 2-D ``*.weight`` that is not an embedding becomes ``lora_A``/``lora_B`` of rank
``min(rank, out, in)`` (or the rank ``ranks`` names for it): ``ΔW = U·S·Vᵀ`` truncated,
``B = U·sqrt(S)``, ``A = sqrt(S)·Vᵀ``, so that PEFT's ``B·A·scaling`` (scaling 1: every
module's ``lora_alpha`` equals its rank) gives ``ΔW`` back.  Matrices whose smaller side is
above ``randomized_above`` use ``torch.svd_lowrank`` (seeded per key: runs are
byte-identical).  ``threshold`` (drop singular values at or below that fraction of the
largest) and ``energy`` (keep the smallest rank holding that fraction of ‖ΔW‖²) choose a
smaller rank per module; since output shapes are declared before any data is read, the
step alone zero-pads to the declared rank, and the ``statebridge lora extract`` command
measures first and passes exact per-module ``ranks``.

Other floating tensors (embeddings, norms, biases) are carried whole under PEFT's
``modules_to_save`` keys, or only those ``save`` lists.  The output is the adapter: every
other tensor of the tuned checkpoint is dropped by this step, each listed in the plan.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

import statebridge as sb

from .adapter import PREFIX

if TYPE_CHECKING:
    import torch

#: 2-D weights that are embeddings (carried whole, as PEFT's modules_to_save), by the names transformers uses
EMBEDDINGS = r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared|embeddings)\.weight$"
#: oversampling of the randomized SVD, as torch.svd_lowrank's documentation suggests
OVERSAMPLE = 8


@dataclass(frozen=True)
class ExtractRecord:
    """One extracted module: its rank, the share of ‖ΔW‖² kept, the relative error ‖ΔW − B·A‖/‖ΔW‖."""

    module: str
    rank: int
    energy: float
    error: float
    randomized: bool


def module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def low_rank(delta: torch.Tensor, rank: int, threshold: float, energy: float | None, randomized_above: int,
             seed_key: str) -> tuple[torch.Tensor, torch.Tensor, int, float, bool]:
    """``B (out, k)``, ``A (k, in)`` with ``B·A ≈ delta``, ``k ≤ rank``; also ``k``, the energy kept, randomized or not."""
    import torch

    q = min(rank, *delta.shape)
    randomized = min(delta.shape) > randomized_above and q + OVERSAMPLE < min(delta.shape)
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(seed_key.encode()))
            u, s, v = torch.svd_lowrank(delta, q=q + OVERSAMPLE, niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    total = float(delta.double().pow(2).sum())
    k = q
    if threshold > 0 and s.numel():
        k = min(k, int((s > threshold * s[0]).sum()))
    if energy is not None and total > 0:
        kept = torch.cumsum(s.double() ** 2, 0) / total
        k = min(k, int((kept < energy).sum()) + 1)
    k = max(k, 1)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).contiguous()
    a = (root[:, None] * vh[:k]).contiguous()
    kept_energy = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    return b, a, k, kept_energy, randomized


class LoraExtract(sb.Transform):
    """A PEFT LoRA adapter from this (tuned) checkpoint minus ``base``: SVD in float32, per module."""

    name = "lora_extract"

    class Params(sb.Params):
        base: sb.PathParam
        rank: int = Field(ge=1)
        threshold: float = Field(0.0, ge=0.0, lt=1.0)
        energy: float | None = Field(None, gt=0.0, le=1.0)
        ranks: dict[str, int] | None = None  # module -> rank, decided beforehand; modules not named are left out
        save: list[str] | None = None  # keys carried whole (modules_to_save); None: every other floating tensor
        fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights as (in, out)
        randomized_above: int = Field(4096, ge=1)
        embeddings: str = EMBEDDINGS

    def __init__(self, params: Any = None, /, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.records: dict[str, ExtractRecord] = {}

    def targets(self, metas: Mapping[str, sb.TensorMeta]) -> list[str]:
        """The keys that become LoRA modules: 2-D floating ``*.weight`` that are not embeddings."""
        embedding = re.compile(self.params.embeddings)
        return [k for k, m in metas.items()
                if k.endswith(".weight") and len(m.shape) == 2 and m.dtype.is_floating_point and not embedding.search(k)]

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        p = self.params
        with sb.open_source(p.base) as base:
            base_metas = dict(base.metas())
        self.records = {}
        targets = set(self.targets(metas))
        if p.ranks is not None:
            unknown = sorted(m for m in p.ranks if f"{m}.weight" not in targets)
            if unknown:
                raise sb.PlanError(f"ranks names modules that are not 2-D weights here: {', '.join(unknown[:5])}")
            targets = {k for k in targets if module_of(k) in p.ranks}
        if p.save is not None:
            unknown = sorted(k for k in p.save if k not in metas)
            if unknown:
                raise sb.PlanError(f"save names keys the tuned checkpoint does not have: {', '.join(unknown[:5])}")
        save = set(p.save) if p.save is not None else {
            k for k, m in metas.items() if m.dtype.is_floating_point and k not in set(self.targets(metas))}
        groups = []
        for key, meta in metas.items():
            if key in targets:
                other = base_metas.get(key)
                if other is None or other.shape != meta.shape:
                    raise sb.PlanError(f"{key!r} is {list(meta.shape)} here but "
                                       f"{'absent' if other is None else list(other.shape)} in the base {p.base}")
                groups.append(self._extract_group(key, meta))
            elif key in save:
                groups.append(sb.Group.rename(key, PREFIX + key, meta, "lora_extract(modules_to_save)"))
            else:
                groups.append(sb.Group(inputs=(key,), outputs={}, compute=lambda t: {}, ops=("lora_extract(not in the adapter)",)))
        return groups

    def _extract_group(self, key: str, meta: sb.TensorMeta) -> sb.Group:
        p = self.params
        module = module_of(key)
        out_f, in_f = meta.shape[::-1] if p.fan_in_fan_out else meta.shape
        rank = p.ranks[module] if p.ranks is not None else min(p.rank, out_f, in_f)
        a_key, b_key = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        outputs = {a_key: _meta((rank, in_f)), b_key: _meta((out_f, rank))}

        def compute(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            import torch

            with sb.open_source(p.base) as base:
                before = base.load(key).float()
            delta = tensors[key].float() - before
            if p.fan_in_fan_out:
                delta = delta.T
            b, a, k, kept, randomized = low_rank(delta, rank, 0.0 if p.ranks else p.threshold,
                                                 None if p.ranks else p.energy, p.randomized_above, key)
            norm = float(torch.linalg.vector_norm(delta))
            error = float(torch.linalg.vector_norm(delta - b @ a)) / norm if norm else 0.0
            self.records[module] = ExtractRecord(module, k, kept, error, randomized)
            full_a = torch.zeros((rank, in_f), dtype=torch.float32)
            full_b = torch.zeros((out_f, rank), dtype=torch.float32)
            full_a[:k], full_b[:, :k] = a, b
            return {a_key: full_a, b_key: full_b}

        return sb.Group(inputs=(key,), outputs=outputs, compute=compute, ops=(f"lora_extract(svd rank {rank})",),
                        effort=4 + rank)


def _meta(shape: tuple[int, ...]) -> sb.TensorMeta:
    """A float32 tensor's meta."""
    return sb.TensorMeta(tuple(shape), sb.DType.of("float32"))


@dataclass
class Survey:
    """What the first pass found: the rank of each changed module, the changed whole tensors, what could not be kept."""

    ranks: dict[str, int]
    save: list[str]
    unchanged: int
    lost: list[str]


def survey(base: str | os.PathLike[str], tuned: str | os.PathLike[str], step: LoraExtract) -> Survey:
    """Read both checkpoints once, pair by pair (bounded memory), and decide what the adapter holds.

    A module whose difference is zero is left out; with ``threshold`` or ``energy`` its rank
    is measured here (the step then repeats the same seeded SVD).  Changed floating tensors
    that are not LoRA targets are saved whole; a changed tensor that is not floating point
    cannot be expressed by PEFT and is listed in ``lost``.
    """
    import torch

    p = step.params
    with sb.open_source(base) as before, sb.open_source(tuned) as after:
        metas, base_metas = dict(after.metas()), dict(before.metas())
        extra = sorted(set(metas) ^ set(base_metas))
        if extra:
            raise sb.PlanError(f"the base and the tuned checkpoint hold different keys: {', '.join(extra[:5])}"
                               + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        for key, meta in metas.items():
            if base_metas[key].shape != meta.shape:
                raise sb.PlanError(f"{key!r} is {list(base_metas[key].shape)} in the base and {list(meta.shape)} tuned")
        targets = set(step.targets(metas))
        ranks: dict[str, int] = {}
        save, lost, unchanged = [], [], 0
        for key, meta in metas.items():
            old, new = before.load(key), after.load(key)
            if torch.equal(old, new):
                unchanged += 1
                continue
            if key in targets:
                delta = new.float() - old.float()
                delta = delta.T if p.fan_in_fan_out else delta
                if p.threshold or p.energy is not None:
                    ranks[module_of(key)] = low_rank(delta, p.rank, p.threshold, p.energy, p.randomized_above, key)[2]
                else:
                    ranks[module_of(key)] = min(p.rank, *delta.shape)
            elif meta.dtype.is_floating_point:
                save.append(key)
            else:
                lost.append(key)
            del old, new
    # PEFT never puts LoRA on a module it saves whole (modules_to_save wins): a LoRA target whose
    # bias (or another tensor) changed too is saved whole, weight included
    for module in {module_of(k) for k in save} & set(ranks):
        del ranks[module]
        save.append(f"{module}.weight")
    return Survey(ranks, [k for k in metas if k in set(save)], unchanged, lost)


def adapter_config(step: LoraExtract, survey: Survey, base: str) -> dict[str, Any]:
    """``adapter_config.json`` for the extracted adapter: scaling 1 in every module (lora_alpha = rank)."""
    top = max(survey.ranks.values(), default=step.params.rank)
    pattern = {re.escape(m): k for m, k in survey.ranks.items() if k != top}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base),
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(survey.ranks),
        "modules_to_save": sorted({module_of(k) for k in survey.save}) or None,
        "fan_in_fan_out": step.params.fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def extract_adapter(base: str, tuned: str, out: str, *, rank: int, threshold: float = 0.0, energy: float | None = None,
                    fan_in_fan_out: bool = False, overwrite: bool = False) -> sb.Report:
    """Write the PEFT adapter folder ``out`` (adapter_model.safetensors + adapter_config.json) for ``tuned - base``."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise sb.ConfigError(f"{out}: an adapter is a folder; this is a file")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise sb.ConfigError(f"{out} exists and is not empty; pass --overwrite to replace the adapter in it")
    probe = LoraExtract(base=str(base), rank=rank, threshold=threshold, energy=energy, fan_in_fan_out=fan_in_fan_out)
    found = survey(base, tuned, probe)
    if not found.ranks and not found.save:
        raise sb.PlanError(f"{tuned} holds the same tensors as {base}: there is nothing to extract")
    step = LoraExtract(base=str(base), rank=rank, fan_in_fan_out=fan_in_fan_out, ranks=found.ranks, save=found.save)
    built = sb.plan(tuned, [step])
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        sb.run(built, None, folder / "adapter_model.safetensors", overwrite=overwrite, progress=False)
    except BaseException as e:
        if created:
            folder.rmdir()  # the run left nothing in it: leave nothing either
        if isinstance(e, sb.SourceError):
            raise sb.ExecutionError(str(e)) from None
        raise
    config = folder / "adapter_config.json"
    staged = folder / ".adapter_config.json.tmp"
    staged.write_text(json.dumps(adapter_config(step, found, base), indent=2, sort_keys=True) + "\n")
    os.replace(staged, config)
    rows = [[r.module, r.rank, f"{r.energy:.6f}", f"{r.error:.3e}", "randomized" if r.randomized else "full"]
            for r in sorted(step.records.values(), key=lambda r: r.module)]
    notes = [f"modules_to_save: {', '.join(sorted({module_of(k) for k in found.save}))}" if found.save else "modules_to_save: none",
             f"{found.unchanged} tensors unchanged (left out)"]
    if found.lost:
        notes.append(f"changed but not floating point, so not in the adapter: {', '.join(found.lost)}")
    return sb.Report(f"lora_extract: wrote {folder}", ["module", "rank", "energy kept", "|dW - BA|/|dW|", "svd"], rows, notes)
