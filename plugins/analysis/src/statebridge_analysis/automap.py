"""``statebridge automap SRC --target T``: candidate rules that would turn SRC's keys into a target's, to review.

The target is whatever says which keys are wanted: another checkpoint, a key list (a text file,
one key a line, optionally ``key<TAB>shape<TAB>dtype``), or a model (``module:factory``, a callable
returning an ``nn.Module``, or a model folder's ``config.json`` built on the meta device through
``transformers``).  The matching is the diff's (:func:`statebridge_analysis.diff.diff`): families
paired by name similarity within buckets of the same shapes, layer numbers aligned, merges and
splits by shapes; the rules are the diff's ``--emit-rules`` (:func:`statebridge_analysis.emit.emit_rules`).
What differs is only what the target knows, and so what the matching may compare:

- a checkpoint, or a key list with shapes and dtypes: names, shapes and dtypes (casts are rules too);
- a model, or a key list with shapes only: names and shapes (a model's dtype is whatever it was built
  in, and loading casts), so both sides' dtypes are set alike before matching;
- a key list of names alone: names only (every shape set alike), so no merge or split is found.

Nothing is applied: the rules are written for a person to review and run.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from statebridge.errors import ConfigError, SourceError, StatebridgeError
from statebridge.tensors.meta import DTYPES, TensorMeta, parse_dtype

from .diff import DiffReport, Names, diff

#: ``package.module:factory``
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
#: the dtype both sides get when dtypes are not compared
_ANY = DTYPES["float32"]
#: kinds of change that leave a key unmatched
_UNMATCHED = frozenset({"removed", "added"})
#: suggestions for unmatched keys shown in the text (``--json`` gives all)
SHOWN = 10


@dataclass
class Target:
    """What the target wants: key -> metadata (None when only the name is known), and what it knows of them."""

    name: str
    metas: dict[str, TensorMeta | None]
    #: what of each tensor the matching compares beside its name: a subset of {"shape", "dtype"}
    compared: frozenset[str]
    #: a checkpoint target's path, opened again to read values (the order of a merge's parts); None for the others
    checkpoint: str | None = None
    #: a model's groups of tied names (one tensor under each): loading fills every name from any one
    tied: list[tuple[str, ...]] = field(default_factory=list)


def read_target(spec: str) -> Target:
    """The target named by ``spec``: ``module:factory``, a ``.json`` model config (or a folder holding one and no
    tensors), a key list (``.txt``, ``.tsv``, ``.keys``, ``.list``), or a checkpoint (anything else, a shard
    index ``*.index.json`` included)."""
    import statebridge as sb

    path = Path(spec)
    if not path.exists() and _FACTORY.fullmatch(spec):
        return _from_module(spec)
    if (path.suffix == ".json" and not path.name.endswith(".index.json")) or (path.is_dir() and (path / "config.json").is_file() and not _has_tensors(path)):
        from .model import module_from_config

        module, config = module_from_config(path)
        return _module_target(module, f"{type(module).__name__} from {config}")
    if path.is_file() and path.suffix in (".txt", ".tsv", ".keys", ".list"):
        return _from_key_list(path)
    with sb.open_source(spec) as source:
        return Target(source.name, dict(source.metas()), frozenset({"shape", "dtype"}), spec)


def _has_tensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")) or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))


def _from_module(spec: str) -> Target:
    module_name, _, attribute = spec.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--target {spec}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(factory):
        raise ConfigError(f"--target {spec}: {attribute} is not callable")
    try:
        module = factory()
    except Exception as e:  # the user's factory: whatever it raises is reported in one line
        raise ConfigError(f"--target {spec}: calling it raised {type(e).__name__}: {e}") from None
    if not hasattr(module, "state_dict"):
        raise ConfigError(f"--target {spec}: returned {type(module).__name__}, not an nn.Module")
    return _module_target(module, spec)


def _module_target(module: Any, name: str) -> Target:
    """A module's ``state_dict()`` keys and shapes, and its tied names (a meta-device module costs no memory)."""
    from .model import tied_groups

    metas = {k: TensorMeta(tuple(v.shape), _ANY) for k, v in module.state_dict(keep_vars=True).items()}
    return Target(name, dict(metas), frozenset({"shape"}), tied=tied_groups(module))


def _from_key_list(path: Path) -> Target:
    """``key`` or ``key<TAB>shape[<TAB>dtype]`` per line (shape as ``[32, 64]``, ``32,64`` or ``32x64``); blank lines
    and ``#`` comments skipped.  Every line must say as much as the others."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(path, f"cannot read the key list: {e}") from None
    metas: dict[str, TensorMeta | None] = {}
    fields_seen: set[int] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) > 3 or not fields[0]:
            raise SourceError(path, f"line {number}: expected key, or key<TAB>shape<TAB>dtype; got {line!r}")
        if fields[0] in metas:
            raise SourceError(path, f"line {number}: {fields[0]!r} is listed twice")
        fields_seen.add(len(fields))
        metas[fields[0]] = None if len(fields) == 1 else _meta(fields[1], fields[2] if len(fields) == 3 else None, path, number)
    if len(fields_seen) > 1:
        raise SourceError(path, "some lines give shapes or dtypes and others do not; give them on every line or on none")
    if not metas:
        raise SourceError(path, "the key list is empty")
    known = {1: frozenset(), 2: frozenset({"shape"}), 3: frozenset({"shape", "dtype"})}[fields_seen.pop()]
    return Target(str(path), metas, known)


def _meta(shape: str, dtype: str | None, path: Path, number: int) -> TensorMeta:
    text = shape.strip().strip("[]()").replace("x", ",")
    try:
        dims = tuple(int(d) for d in text.split(",") if d.strip())
        return TensorMeta(dims, parse_dtype(dtype) if dtype else _ANY)
    except (ValueError, StatebridgeError) as e:
        raise SourceError(path, f"line {number}: cannot read shape {shape!r} / dtype {dtype!r}: {e}") from None


def matched_metas(
    source: Mapping[str, TensorMeta], target: Target
) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
    """Both sides' metadata as the matching compares them: what the target does not know is set alike on both."""
    def seen(meta: TensorMeta | None) -> TensorMeta:
        shape = meta.shape if meta is not None and "shape" in target.compared else ()
        if "dtype" in target.compared:
            assert meta is not None
            return meta if "shape" in target.compared else TensorMeta(shape, meta.dtype, meta.stored)
        return TensorMeta(shape, _ANY)

    return {k: seen(m) for k, m in source.items()}, {k: seen(m) for k, m in target.metas.items()}


@dataclass
class Automap:
    """The matching of a source against a target: the diff between them, and the coverage its rules reach."""

    report: DiffReport
    target: Target
    sources: int
    targets: int
    #: both sides' metadata as the matching compared them (what the suggestions compare too)
    metas: tuple[dict[str, TensorMeta], dict[str, TensorMeta]]

    def filled(self) -> dict[str, str]:
        """Target keys no rule makes that a tie fills (loading gives them a matched partner's tensor): key -> partner."""
        made = {k for c in self.report.changes if c.kind != "added" for k in c.b}
        out = {}
        for group in self.target.tied:
            partner = next((k for k in group if k in made), None)
            if partner is not None:
                out.update((k, partner) for k in group if k not in made)
        return out

    def coverage(self) -> dict[str, Any]:
        """How many source keys the rules use and target keys they make (or a tie fills), and which are left over."""
        filled = self.filled()
        left_a = [k for c in self.report.changes if c.kind == "removed" for k in c.a]
        left_b = [k for c in self.report.changes if c.kind == "added" for k in c.b if k not in filled]
        return {
            "source_matched": self.sources - len(left_a), "source_keys": self.sources,
            "target_matched": self.targets - len(left_b), "target_keys": self.targets,
            "source_unmatched": left_a, "target_unmatched": left_b, "target_tied": filled,
        }

    def suggestions(self, coverage: Mapping[str, Any]) -> dict[str, list[str]]:
        """Did you mean: for each source key no rule uses, the nearest target keys no rule makes (names and shapes)."""
        from .suggest import nearest

        ma, mb = self.metas
        left_b = {k: mb[k] for k in coverage["target_unmatched"]}
        return nearest({k: ma[k] for k in coverage["source_unmatched"]}, left_b) if left_b else {}

    def to_dict(self) -> dict[str, Any]:
        rows = self.report.folded()
        coverage = self.coverage()
        return {
            "source": self.report.a, "target": self.report.b, "compared": sorted({"name", *self.target.compared}),
            "rules": [r for r in rows if r["kind"] not in _UNMATCHED], "coverage": coverage,
            "suggestions": self.suggestions(coverage),
        }

    def render(self) -> str:
        lines = [f"source: {self.report.a}", f"target: {self.report.b} (compared: {compared_text(self.target)})", "candidate rules:"]
        c = self.coverage()
        report = self.report
        kept = [i for i in report.items if not (i.kind == "added" and i.b[0] in c["target_tied"])]
        rows = DiffReport(report.a, report.b, kept, report.names).folded()
        for row in rows:
            if row["kind"] in _UNMATCHED:
                continue
            extra = [row["detail"]] if row["detail"] else []
            if "confidence" in row:
                extra.append(f"score {row['confidence']:.2f}")
            lines.append(f"  {row['kind']:<13} {row['a']} -> {row['b']}" + (f"  ({'; '.join(extra)})" if extra else ""))
        lines.append(
            f"coverage: {c['source_matched']} of {c['source_keys']} source keys ({_share(c['source_matched'], c['source_keys'])}), "
            f"{c['target_matched']} of {c['target_keys']} target keys ({_share(c['target_matched'], c['target_keys'])})"
        )
        if c["target_tied"]:
            lines.append("target keys a tie fills (loading gives them their partner's tensor):")
            lines.extend(f"  {k} (tied to {partner})" for k, partner in c["target_tied"].items())
        for kind, what in (("removed", "source keys no rule uses (the rules drop them)"), ("added", "target keys no rule makes")):
            left = [r for r in rows if r["kind"] == kind]
            if left:
                lines.append(f"{what}:")
                lines.extend(f"  {r['a'] if kind == 'removed' else r['b']}" for r in left)
        near = self.suggestions(c)
        if near:
            lines.append("did you mean (nearest target keys no rule makes, for a rule to write by hand):")
            lines.extend(f"  {k} -> {' or '.join(v)}" for k, v in list(near.items())[:SHOWN])
            if len(near) > SHOWN:
                lines.append(f"  ... and {len(near) - SHOWN} more (--json lists them all)")
        return "\n".join(lines)


def compared_text(target: Target) -> str:
    """What the matching compared: ``names``, ``names, shapes`` or ``names, shapes, dtypes``."""
    return ", ".join(["names", *(f"{c}s" for c in ("shape", "dtype") if c in target.compared)])


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def automap(source_metas: Mapping[str, TensorMeta], source_name: str, target: Target) -> tuple[Automap, dict[str, TensorMeta], dict[str, TensorMeta]]:
    """The diff of the source against the target as far as the target knows its tensors, and the metadata it compared."""
    ma, mb = matched_metas(source_metas, target)
    names = Names()
    report = DiffReport(source_name, target.name, diff(ma, mb, names, shapes_known="shape" in target.compared), names)
    return Automap(report, target, len(ma), len(mb), (ma, mb)), ma, mb
