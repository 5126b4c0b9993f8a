"""``statebridge lint``: what is wrong with a checkpoint, found by reading it once. Report only, never fixes.

Checks, each finding naming its keys (see the plugin README for what each means):

==================  =======  ===========================================================
check               level    finding
==================  =======  ===========================================================
``nan_inf``         error    the tensor holds NaN or Inf values (counts, first index)
``zero``            warning  every element is zero
``duplicate``       warning  two names hold the same bytes and no model ties them
``sibling``         warning  a layer's tensor differs in shape or dtype from the same key
                             in most other layers
``mixed_dtypes``    warning  floating-point tensors in several dtypes
``orphan``          warning  the model has no such key (``--model``)
``missing``         error    the model needs the key and nothing present stands for it
``model_shape``     error    the model's tensor of that name has another shape
``tied_differ``     error    names the model ties hold different bytes
``checksum``        error    (``--verify``) the bytes differ from the manifest's; or a key
                             is in one but not the other; or its shape or dtype changed
==================  =======  ===========================================================

Tensors are read one at a time, a chunk at a time (:mod:`.scan`): memory stays bounded by
the chunk, and a safetensors or plain GGUF checkpoint is examined without torch.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statebridge.errors import SourceError
from statebridge.tensors.patterns import compress_keys, family, shown

from .scan import Scanner, TensorScan

if TYPE_CHECKING:
    from statebridge import Source, TensorMeta

    from .model import Expected

LEVELS = ("error", "warning")
MANIFEST_FORMAT = "statebridge-manifest"


@dataclass(frozen=True)
class LintFinding:
    """One thing lint found: its level, the check that found it, the keys involved and what it means."""

    level: str
    check: str
    keys: tuple[str, ...]
    message: str


@dataclass
class LintReport:
    """Every finding about one checkpoint, in a stable order (by level, check, then storage order)."""

    source: str
    tensors: int
    model: str | None
    findings: list[LintFinding] = field(default_factory=list)
    manifest_written: str | None = None

    @property
    def errors(self) -> int:
        return sum(f.level == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        counts = Counter(f.level for f in self.findings)
        return {
            "source": self.source,
            "model": self.model,
            "tensors": self.tensors,
            "counts": {level: counts.get(level, 0) for level in LEVELS},
            "findings": [{**asdict(f), "keys": list(f.keys)} for f in self.findings],
            **({"manifest_written": self.manifest_written} if self.manifest_written else {}),
        }

    def render(self) -> str:
        """Findings one per line; findings of one check with the same message fold their keys into ranges."""
        lines = [f"{self.source}: {self.tensors} tensors" + (f", checked against {self.model}" if self.model else "")]
        folded: dict[object, tuple[LintFinding, list[str]]] = {}
        for i, f in enumerate(self.findings):  # a finding about several keys together (duplicates) stays on its own line
            line = (f.level, f.check, f.message) if len(f.keys) == 1 else i
            folded.setdefault(line, (f, []))[1].extend(f.keys)
        for f, keys in folded.values():
            level, check, message = f.level, f.check, f.message
            names = ", ".join(compress_keys(list(dict.fromkeys(keys))))
            lines.append(f"  {level:<7} {check:<12} {names}: {message}")
        counts = Counter(f.level for f in self.findings)
        summary = ", ".join(f"{counts.get(level, 0)} {level}{'s' if counts.get(level, 0) != 1 else ''}" for level in LEVELS)
        lines.append(summary if self.findings else "no findings")
        if self.manifest_written:
            lines.append(f"manifest written to {self.manifest_written}")
        return "\n".join(lines)


def lint(
    source: Source,
    expected: Expected | None = None,
    verify: Mapping[str, Any] | None = None,
) -> tuple[LintReport, dict[str, TensorScan]]:
    """Lint ``source`` (against ``expected``, a model's keys, and ``verify``, a manifest); also return each tensor's scan.

    The scans (checksums and counts, a few hundred bytes per tensor) are what a manifest is written from.
    """
    metas = source.metas()
    findings: list[LintFinding] = []
    scans: dict[str, TensorScan] = {}
    with Scanner(source) as scanner:
        for scan in scanner.scan_all():
            scans[scan.key] = scan
            findings.extend(_values(scan, metas[scan.key]))
    tied = expected.tied_partners() if expected else {}
    findings.extend(_duplicates(scans, metas, tied, expected is not None))
    findings.extend(_siblings(metas, expected))
    findings.extend(_mixed_dtypes(metas))
    if expected is not None:
        findings.extend(_against_model(metas, scans, expected))
    if verify is not None:
        findings.extend(_verify(metas, scans, verify))
    order = {key: i for i, key in enumerate(metas)}
    findings.sort(key=lambda f: (LEVELS.index(f.level), f.check, min((order.get(k, len(order)) for k in f.keys), default=0)))
    return LintReport(source.name, len(metas), expected.name if expected else None, findings), scans


def _values(scan: TensorScan, meta: TensorMeta) -> Iterable[LintFinding]:
    if scan.nan or scan.inf:
        yield LintFinding(
            "error",
            "nan_inf",
            (scan.key,),
            f"{scan.nan} NaN and {scan.inf} Inf of {scan.numel} values, the first at flat index {scan.first_bad} ({meta})",
        )
    if scan.zero and scan.numel > 1:
        yield LintFinding("warning", "zero", (scan.key,), "every value is zero")


def _duplicates(
    scans: Mapping[str, TensorScan], metas: Mapping[str, TensorMeta], tied: Mapping[str, tuple[str, ...]], with_model: bool
) -> Iterable[LintFinding]:
    """Names with the same bytes, shape and dtype that no model ties.

    Constant tensors (all zero, all one: untrained norms and biases) are alike by nature and left
    out; a zero tensor has its own finding.
    """
    by_content: dict[tuple[str, tuple[int, ...], str], list[str]] = defaultdict(list)
    for key, scan in scans.items():
        meta = metas[key]
        if scan.numel > 1 and not scan.constant and scan.checked_values:
            by_content[(scan.sha256, meta.shape, str(meta))].append(key)
    for keys in by_content.values():
        if len(keys) < 2:
            continue
        if any(not set(keys) <= set(tied.get(k, (k,))) for k in keys):  # not all of them one tied group
            yield LintFinding(
                "warning",
                "duplicate",
                tuple(keys),
                "the same bytes under several names, not tied by the model"
                + ("" if with_model else " (no model given to say which are tied)"),
            )


def _siblings(metas: Mapping[str, TensorMeta], expected: Expected | None) -> Iterable[LintFinding]:
    """Keys that differ from most keys of their family (the same name, another layer number) in shape or dtype.

    A family needs at least three members and a strict majority to say which is odd; a key whose
    shape the model expects is not reported (some architectures vary widths by layer on purpose).
    """
    families: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for key in metas:
        families[family(key)].append(key)
    for keys in families.values():
        if len(keys) < 3:
            continue
        kinds = Counter((metas[k].shape, metas[k].dtype.name) for k in keys)
        (common, count), = kinds.most_common(1)
        if count == len(keys) or count * 2 <= len(keys):
            continue
        shape, dtype = common
        for key in keys:
            meta = metas[key]
            if (meta.shape, meta.dtype.name) == common:
                continue
            if expected is not None and expected.shapes.get(key) == meta.shape and meta.dtype.name == dtype:
                continue
            yield LintFinding("warning", "sibling", (key,), f"is {meta}, but {count} of the {len(keys)} keys like it are {dtype}{list(shape)}")


def _mixed_dtypes(metas: Mapping[str, TensorMeta]) -> Iterable[LintFinding]:
    """Floating-point tensors in more than one dtype: the keys in the rarer dtypes are named."""
    by_dtype: dict[str, list[str]] = defaultdict(list)
    for key, meta in metas.items():
        if meta.dtype.is_floating_point:
            by_dtype[meta.dtype.name].append(key)
    if len(by_dtype) < 2:
        return
    main = max(by_dtype, key=lambda d: (len(by_dtype[d]), d))
    counts = ", ".join(f"{len(keys)} {dtype}" for dtype, keys in sorted(by_dtype.items(), key=lambda i: -len(i[1])))
    for dtype, keys in by_dtype.items():
        if dtype != main:
            yield LintFinding("warning", "mixed_dtypes", tuple(keys), f"{dtype} where most floating-point tensors are {main} ({counts})")


def _against_model(metas: Mapping[str, TensorMeta], scans: Mapping[str, TensorScan], expected: Expected) -> Iterable[LintFinding]:
    tied = expected.tied_partners()
    for key, meta in metas.items():
        if key not in expected.shapes:
            yield LintFinding("warning", "orphan", (key,), "the model has no such key (loading ignores or rejects it)")
        elif expected.shapes[key] != meta.shape:
            yield LintFinding("error", "model_shape", (key,), f"is {list(meta.shape)}; the model expects {list(expected.shapes[key])}")
    for key in expected.shapes:
        if key in metas:
            continue
        partners = [k for k in tied.get(key, ()) if k in metas]
        if partners:
            continue  # saved under the name it is tied to
        why = (
            f"the model ties it to {', '.join(k for k in tied[key] if k != key)}, which is missing too"
            if key in tied
            else "the model needs it and ties it to no other tensor"
        )
        yield LintFinding("error", "missing", (key,), why)
    order = {key: i for i, key in enumerate(metas)}
    for group in expected.tied:
        present = sorted((k for k in group if k in scans), key=order.__getitem__)
        if len({scans[k].sha256 for k in present}) > 1:
            yield LintFinding("error", "tied_differ", tuple(present), "the model ties these names, but their bytes differ")


def _verify(metas: Mapping[str, TensorMeta], scans: Mapping[str, TensorScan], manifest: Mapping[str, Any]) -> Iterable[LintFinding]:
    recorded: Mapping[str, Mapping[str, Any]] = manifest["tensors"]
    for key, scan in scans.items():
        entry = recorded.get(key)
        if entry is None:
            yield LintFinding("error", "checksum", (key,), "not in the manifest")
            continue
        meta = metas[key]
        if entry["shape"] != list(meta.shape) or entry["dtype"] != meta.dtype.name or entry.get("stored") != meta.stored:
            yield LintFinding("error", "checksum", (key,), f"is {meta}; the manifest has {_described(entry)}")
        elif entry["sha256"] != scan.sha256:
            yield LintFinding("error", "checksum", (key,), f"bytes differ from the manifest (sha256 {scan.sha256[:16]}..., recorded {entry['sha256'][:16]}...)")
    for key in recorded:
        if key not in scans:
            yield LintFinding("error", "checksum", (key,), "in the manifest but not in the checkpoint")


def _described(entry: Mapping[str, Any]) -> str:
    stored = f" (stored {entry['stored']})" if entry.get("stored") else ""
    return f"{entry['dtype']}{entry['shape']}{stored}"


def manifest(source: Source, scans: Mapping[str, TensorScan]) -> dict[str, Any]:
    """The manifest of ``source``: per tensor, in storage order, its dtype, shape and sha256 of its stored bytes."""
    metas = source.metas()
    tensors: dict[str, Any] = {}
    for key, scan in scans.items():
        meta = metas[key]
        entry: dict[str, Any] = {"dtype": meta.dtype.name, "shape": list(meta.shape), "sha256": scan.sha256}
        if meta.stored:
            entry["stored"] = meta.stored
        tensors[key] = entry
    return {"format": MANIFEST_FORMAT, "version": 1, "algorithm": "sha256", "tensors": tensors}


def write_manifest(data: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the manifest atomically (a half-written manifest would fail every later verify)."""
    target = Path(path)
    staging = target.with_name(f".{target.name}.partial")
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(_manifest_text(data))
        os.replace(staging, target)
    except OSError as e:
        staging.unlink(missing_ok=True)
        raise SourceError(target, f"cannot write the manifest: {e.strerror or e}") from None


def _manifest_text(data: Mapping[str, Any]) -> str:
    """JSON with one line per tensor: readable, and a line diff of two manifests names the tensors that changed."""
    head = {k: v for k, v in data.items() if k != "tensors"}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "tensors": {']
    entries = [f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in data["tensors"].items()]
    lines.append(",\n".join(entries))
    lines.append("}}")
    return "\n".join(lines) + "\n"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A manifest :func:`write_manifest` wrote; anything else is refused in one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SourceError(path, f"cannot read the manifest: {e.strerror or e}") from None
    except ValueError as e:
        raise SourceError(path, f"is not a manifest (not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("tensors"), dict):
        raise SourceError(path, "is not a statebridge manifest (written by `statebridge lint --write-manifest`)")
    if data.get("algorithm") != "sha256" or data.get("version") != 1:
        raise SourceError(path, f"manifest version {data.get('version')!r} / {data.get('algorithm')!r} is not known here")
    for key, entry in data["tensors"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)):
            raise SourceError(path, f"manifest entry for {shown(str(key))!r} lacks sha256, shape or dtype")
    return data
