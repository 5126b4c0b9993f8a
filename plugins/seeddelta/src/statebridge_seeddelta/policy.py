"""The ``--policy`` file: per-layer, per-tensor SeedΔ settings, merged in a fixed order, validated, hashed.

::

    {"version": 1,
     "defaults": {"K": {"gate": 256, "up": 256, "down": 512}, "strip": true,
                  "gating": {"min_mean": {"gate": 0.45, "up": 0.45, "down": 0.25}, ...},
                  "autotune": {"enabled": false, "schedule": {"gate": [128, 256], ...}}},
     "ranges": [{"layers": "15-20", "autotune": {"enabled": true}}],
     "layers": {"8": {"enable": false},
                "19": {"tensors": {"ffn_down": {"K": 768}}}}}

A layer's tensor ``T`` gets: the built-in defaults, then ``defaults``, then each entry of
``ranges`` whose ``layers`` (``"15-20"``, ``"3"``, ``"1-4,9"``) holds the layer, in file
order, then ``layers["L"]``, then ``layers["L"].tensors["T"]``; nested objects
(``gating``, ``autotune``) merge key by key, anything else is replaced. A value may be
given per tensor type (``{"gate": .., "up": .., "down": ..}``, or ``ffn_gate``...) wherever
it is a number, a list or a band. Unknown keys and bad values are errors naming their
place in the file (``policy.json: layers.19.tensors.ffn_down.K: ...``). The hash is the
SHA-256 of the file's canonical JSON (sorted keys): two files that mean the same give one hash.
The seed's own names ``schedule_gate_up`` / ``schedule_down`` are accepted in ``autotune``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from statebridge import ConfigError

from .fit import FitSpec
from .names import TENSOR_TYPES

VERSION = 1
_SHORT = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def _per_type(value: Any, kind: str) -> Any:
    """``value`` for tensor type ``kind`` when it is given per type, else ``value``."""
    if isinstance(value, dict) and value and set(value) <= set(_SHORT) | set(TENSOR_TYPES):
        for key, full in _SHORT.items():
            if full == kind:
                return value.get(key, value.get(full))
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Number = float | dict[str, float]
Integer = int | dict[str, int]


class GatingSection(_Strict):
    metric: Literal["cos_xw", "cos_w"] | None = None
    min_mean: Number | None = None
    min_p05: Number | None = None
    norm_ratio: list[float] | dict[str, list[float]] | None = None


class AutotuneSection(_Strict):
    enabled: bool | None = None
    schedule: list[int] | dict[str, list[int]] | None = None
    schedule_gate_up: list[int] | None = None
    schedule_down: list[int] | None = None
    max_iters: int | None = Field(None, ge=1)


class Section(_Strict):
    """What ``defaults``, a range, a layer or a tensor may set; everything optional (it is merged)."""

    enable: bool | None = None
    base: Literal["xor_circulant", "lowrank", "none"] | None = None
    scheme: Literal["coo", "block"] | None = None
    block: int | None = Field(None, ge=1)
    K: Integer | None = None
    row_scale: bool | None = None
    depth: int | None = Field(None, ge=1)
    perm_trials: int | None = Field(None, ge=1)
    tile: int | None = None
    rank_share: float | None = Field(None, gt=0, lt=1)
    alternations: int | None = Field(None, ge=1)
    refit: bool | None = None
    ridge: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0)
    strip: bool | None = None
    gating: GatingSection | None = None
    autotune: AutotuneSection | None = None

    @field_validator("tile")
    @classmethod
    def _pow2(cls, v: int | None) -> int | None:
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError("tile must be a power of two")
        return v


class RangeSection(Section):
    layers: str

    @field_validator("layers")
    @classmethod
    def _range(cls, v: str) -> str:
        parse_layers(v)
        return v


class LayerSection(Section):
    tensors: dict[Literal["ffn_gate", "ffn_up", "ffn_down"], Section] = Field(default_factory=dict)


class Document(_Strict):
    version: Literal[1]
    defaults: Section = Field(default_factory=Section)
    ranges: list[RangeSection] = Field(default_factory=list)
    layers: dict[str, LayerSection] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _numbers(cls, v: dict[str, LayerSection]) -> dict[str, LayerSection]:
        for key in v:
            if not key.isdigit():
                raise ValueError(f"layer key {key!r} is not a layer number")
        return v


def parse_layers(text: str) -> set[int]:
    """``"15-20"``, ``"3"``, ``"1-4,9"`` -> the layer numbers."""
    found: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ValueError(f"{text!r} is not a layer range like '15-20' or '1-4,9'")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"{text!r}: the range {a}-{b} runs backwards")
        found.update(range(a, b + 1))
    return found


#: what a tensor gets when the policy says nothing (the seed's safety-first thresholds)
BUILTIN: dict[str, Any] = {
    "enable": True, "base": "lowrank", "scheme": "coo", "block": 32,
    "K": {"gate": 256, "up": 256, "down": 512}, "row_scale": True, "depth": 2, "perm_trials": 4, "tile": None,
    "rank_share": 0.25, "alternations": 10, "refit": True, "ridge": 0.05, "seed": 0, "strip": False,
    "gating": {"metric": "cos_xw", "min_mean": {"gate": 0.45, "up": 0.45, "down": 0.25},
               "min_p05": {"gate": 0.30, "up": 0.30, "down": 0.15}, "norm_ratio": [0.8, 1.25]},
    "autotune": {"enabled": False, "schedule": {"gate": [128, 256, 384, 512], "up": [128, 256, 384, 512],
                                                "down": [256, 512, 768, 1024]}, "max_iters": 4},
}


class Gating(BaseModel):
    metric: Literal["cos_xw", "cos_w"]
    min_mean: float
    min_p05: float | None
    norm_ratio: tuple[float, float] | None


class Autotune(BaseModel):
    enabled: bool
    schedule: list[int]
    max_iters: int


class Resolved(BaseModel):
    """One tensor's settings after the merge."""

    enable: bool
    strip: bool
    spec: FitSpec
    gating: Gating
    autotune: Autotune

    def report(self) -> dict[str, Any]:
        spec = {k: getattr(self.spec, k) for k in self.spec.__dataclass_fields__}
        return {"enable": self.enable, "strip": self.strip, **spec, "gating": self.gating.model_dump(),
                "autotune": self.autotune.model_dump()}


def _merge(into: dict[str, Any], section: dict[str, Any]) -> None:
    for key, value in section.items():
        if key in ("gating", "autotune") and isinstance(value, dict):
            into[key] = {**into.get(key, {}), **value}
        else:
            into[key] = copy.deepcopy(value)


class Policy:
    """A validated policy document (or the built-in defaults alone), its file name and hash."""

    def __init__(self, document: dict[str, Any], source: str = "<built-in>") -> None:
        self.source = source
        try:
            self.doc = Document.model_validate(document)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "literal[", "int", "float",
                                                                                       "list[", "dict[", "bool")))
            raise ConfigError(f"{source}: {where or '(top level)'}: {first['msg']}") from None
        self.raw = document
        self.hash = hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        self.ranges = [(parse_layers(r.layers), r) for r in self.doc.ranges]

    @classmethod
    def load(cls, path: str | Path | None) -> Policy:
        if path is None:
            return cls({"version": VERSION})
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the policy: {e.strerror or e}") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: a policy is a JSON object")
        return cls(document, str(path))

    @property
    def version(self) -> int:
        return self.doc.version

    def resolve(self, layer: int, kind: str) -> Resolved:
        """The settings of tensor type ``kind`` in ``layer``: built-in → defaults → ranges → layer → tensor."""
        merged = copy.deepcopy(BUILTIN)
        sections: list[tuple[str, Section]] = [("defaults", self.doc.defaults)]
        sections += [(f"ranges[{i}]", r) for i, (found, r) in enumerate(self.ranges) if layer in found]
        entry = self.doc.layers.get(str(layer))
        if entry is not None:
            sections.append((f"layers.{layer}", entry))
            if kind in entry.tensors:
                sections.append((f"layers.{layer}.tensors.{kind}", entry.tensors[kind]))
        for _, section in sections:
            _merge(merged, section.model_dump(exclude_none=True, exclude={"layers", "tensors"}))
        g, a = merged["gating"], merged["autotune"]
        schedule = a.get("schedule")
        if kind in ("ffn_gate", "ffn_up") and a.get("schedule_gate_up"):
            schedule = a["schedule_gate_up"]
        if kind == "ffn_down" and a.get("schedule_down"):
            schedule = a["schedule_down"]
        where = f"{self.source}: layer {layer} {kind}"
        pick = lambda v: _per_type(v, kind)  # noqa: E731
        try:
            spec = FitSpec(K=int(pick(merged["K"])), **{k: pick(merged[k]) for k in (
                "base", "scheme", "block", "row_scale", "depth", "perm_trials", "tile", "rank_share", "alternations",
                "refit", "ridge", "seed")})
            steps = [int(k) for k in pick(schedule)]
            if steps != sorted(set(steps)):
                raise ConfigError(f"{where}: autotune.schedule {steps} must increase")
            band = pick(g.get("norm_ratio"))
            return Resolved(
                enable=merged["enable"], strip=merged["strip"], spec=spec,
                gating=Gating(metric=g["metric"], min_mean=pick(g["min_mean"]), min_p05=pick(g.get("min_p05")),
                              norm_ratio=tuple(band) if band is not None else None),
                autotune=Autotune(enabled=a["enabled"], schedule=steps, max_iters=a["max_iters"]))
        except (ValidationError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: the merged settings are incomplete or wrong: {str(e).splitlines()[0]}") from None
