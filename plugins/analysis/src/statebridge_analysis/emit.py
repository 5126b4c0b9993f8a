"""``statebridge diff A B --emit-rules FILE``: a pipeline config that turns A into B, for a person to review.

Built from the diff's folded groups (the header-only diff's, or ``--content``'s, which pairs
by values), so each rule covers a whole family of layers:

- ``drop`` for what B lacks (a family's glob when all of it goes, else the keys);
- in one ``parallel`` step (so no rule renames what another wrote): ``concat`` for merges and
  ``split`` for splits (along any dim), with globs over the layer numbers; ``rename`` with a glob
  for each family renamed whole with its layer numbers; ``rename`` with a ``mapping`` for the
  rest (layer numbers shifted, a family paired piecemeal: a glob cannot say either);
- on B's names: ``transpose`` where B holds the transpose (square ones found by ``--content``),
  ``permute_rows`` where B holds the rows in another order (the rotary interleave by its heads,
  else the order), ``cast`` where B's dtype differs, ``quantize`` where B stores a tensor in a GGML
  type (Q8_0, Q4_K, ...) its source is not stored in.

The order in which parts were concatenated cannot be read from headers (q, k and v of
grouped-query attention: k and v have one size), so for each merge or split family the first
layer's tensors are read and the order whose values agree is used; when none agrees (the values
changed too) the storage order is kept and the rule says so in a comment.

The rules are planned against A before they are written: where the plan's outputs (names,
shapes, dtypes) differ from B's, the differences are returned for the command to report.
Tensors only B has cannot be made from A: they are listed as comments.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from .content import rotary_of
from .diff import Change, DiffReport, values_text

if TYPE_CHECKING:
    from statebridge import Source, TensorMeta


def _glob(template: tuple[str, ...]) -> str:
    """A family's template as a glob: each layer number a ``*``."""
    return "*".join(template)


def emit_rules(
    report: DiffReport, a: Source, b: Source | None, *, metas: tuple[Mapping[str, TensorMeta], Mapping[str, TensorMeta]] | None = None,
    compared: frozenset[str] = frozenset({"shape", "dtype"}), made_by: str = "statebridge diff A B --emit-rules",
    filled: Mapping[str, str] | None = None,
) -> tuple[str, list[str]]:
    """The config text, and the ways its plan's outputs differ from B (empty when they match B's headers).

    ``b`` is None when B has no values to read (``automap``'s target: a model, a key list): the parts of a
    merge or split are then ordered by their names.  ``metas`` are the two sides' metadata the report was
    made from (default: the sources'), ``compared`` what of a tensor the check against B compares beside
    its name (``shape``, ``dtype``).  ``filled``: B's keys a tie fills from a partner the rules make (a model's
    tied ``lm_head``), noted as such rather than as missing.
    """
    filled = filled or {}
    assert b is not None or metas is not None
    ma, mb = metas or (a.metas(), b.metas())
    names = report.names
    groups = report.groups(skip=frozenset({"unchanged"}))
    families_a: dict[tuple[str, ...], int] = defaultdict(int)
    for key in ma:
        families_a[names(key)[0]] += 1
    families_b: dict[tuple[str, ...], int] = defaultdict(int)
    for key in mb:
        families_b[names(key)[0]] += 1
    drops: list[str] = []
    parallel: list[dict[str, Any]] = []
    notes: list[str] = []
    #: (A's template, B's template) -> the (A key, B key) pairs that change name
    renames: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[str, str]]] = defaultdict(list)
    #: a per-key step on B's names (``transpose``, ``permute_rows``) -> B's keys it applies to, by B's template
    per_key: dict[tuple[str, tuple[str, ...], tuple[Any, ...]], list[str]] = defaultdict(list)
    for (kind, detail, templates_a, templates_b), changes in groups.items():
        if kind == "removed":
            (template,) = templates_a
            whole = families_a[template] == len(changes)
            drops.extend([_glob(template)] if whole else [c.a[0] for c in changes])
        elif kind in ("merged", "split"):
            parallel.append(_join_rule(kind, changes[0], templates_a, templates_b, a, b, ma, mb, notes))
        elif kind == "added":
            notes.extend(
                f"{c.b[0]}: tied to {filled[c.b[0]]} in B; loading fills it" if c.b[0] in filled
                else f"{c.b[0]}: only in B; no rule can make it from A" for c in changes
            )
        elif kind == "shape_changed" and not _transposes(changes[0], ma, mb):
            notes.extend(f"{c.a[0]}: {c.detail}; no rule reshapes it" for c in changes)
        else:  # one tensor of A for one of B: renamed, moved, transposed, permuted, cast, values changed
            renames[(templates_a[0], templates_b[0])].extend((c.a[0], c.b[0]) for c in changes if c.a[0] != c.b[0])
            for c in changes:
                if kind == "transposed" or kind == "shape_changed":
                    per_key[("transpose", templates_b[0], ())].append(c.b[0])
                elif kind == "permuted" and c.rows is not None:
                    per_key[("permute_rows", templates_b[0], _row_params(c.rows))].append(c.b[0])
            notes.extend(_value_notes(changes, ma, mb))
    mapping: dict[str, str] = {}
    for (template_a, template_b), pairs in renames.items():
        if not pairs:
            continue
        if len(pairs) == families_a[template_a] and all(names(x)[1] == names(y)[1] for x, y in pairs):
            parallel.append({"rename": {"pattern": _glob(template_a), "to": _glob(template_b)}})
        else:  # part of a family, or layer numbers that moved: a glob cannot say it
            mapping.update(pairs)
    if mapping:
        parallel.append({"rename": {"mapping": mapping}})
    after: list[dict[str, Any]] = []
    for (step, template_b, params), keys in per_key.items():
        patterns = [_glob(template_b)] if len(keys) == families_b[template_b] else keys
        after.extend({step: {"pattern": p, **{k: list(v) if isinstance(v, tuple) else v for k, v in params}}} for p in patterns)
    steps: list[dict[str, Any]] = []
    if drops:
        steps.append({"drop": {"keys": drops}})
    if parallel:
        steps.append(parallel[0] if len(parallel) == 1 else {"parallel": {"steps": parallel}})
    steps.extend(after)
    steps.extend(_casts(report.changes, ma, mb, names))
    text = _render(report, steps, notes, made_by)
    return text, [p for p in _check(a, steps, mb, compared) if p.removesuffix(": only in B") not in filled]


def _transposes(c: Change, ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta]) -> bool:
    """Whether a shape change is a transpose (a 2-D tensor of the swapped shape), which a rule can undo."""
    return len(ma[c.a[0]].shape) == 2 and ma[c.a[0]].shape == tuple(reversed(mb[c.b[0]].shape))


def _row_params(rows: tuple[int, ...]) -> tuple[tuple[str, Any], ...]:
    """``permute_rows``'s parameters for a permutation of rows: the rotary interleave by its heads, or the order."""
    rotary = rotary_of(rows)
    if rotary is None:
        return (("order", rows),)
    heads, back = rotary
    return (("rotary_heads", heads), ("reverse", True)) if back else (("rotary_heads", heads),)


def _value_notes(changes: list[Change], ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta]) -> list[str]:
    """A note for a group whose values ``--content`` found different (a cast explains its own): no rule makes them."""
    differ = [
        c for c in changes
        if ma[c.a[0]].dtype == mb[c.b[0]].dtype and ((c.values is not None and c.values[0] != 0) or c.detail.endswith("content differs"))
    ]
    if not differ:
        return []
    first = differ[0]
    how = values_text(*first.values) if first.values is not None else "content differs"
    more = f" (and {len(differ) - 1} more like it)" if len(differ) > 1 else ""
    return [f"{first.b[0]}{more}: B's values differ from A's ({how}); the rules carry A's values"]


def _join_rule(
    kind: str, first: Change, templates_a: tuple, templates_b: tuple, a: Source, b: Source | None,
    ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], notes: list[str],
) -> dict[str, Any]:
    """A ``concat`` (merge) or ``split`` rule over a family, its parts in the order the first layer's values show
    (in the order their names take in the whole's name when B has no values)."""
    dim = first.dim
    assert dim is not None
    parts, whole = (first.a, first.b[0]) if kind == "merged" else (first.b, first.a[0])
    if b is None:
        order = named_order(parts, whole)
        notes.append(f"{whole}: the order of its parts {', '.join(parts[i] for i in order)} is read from the names "
                     "(the target has no values); check it")
    else:
        order = _order(parts, whole, a, b, dim) if kind == "merged" else _order(parts, whole, b, a, dim)
        if order is None:
            notes.append(f"{whole}: no order of {', '.join(parts)} gives its values; storage order kept")
            order = list(range(len(parts)))
    if kind == "merged":
        return {"concat": {"inputs": [_glob(templates_a[i]) for i in order], "output": _glob(templates_b[0]), "dim": dim}}
    return {
        "split": {
            "input": _glob(templates_a[0]),
            "outputs": [_glob(templates_b[i]) for i in order],
            "dim": dim,
            "sizes": [mb[first.b[i]].shape[dim] for i in order],
        }
    }


def named_order(parts: tuple[str, ...], whole: str) -> list[int]:
    """The parts ordered by where the text that tells them apart stands in the whole's name
    (``q``, ``k``, ``v`` in ``qkv_proj``; ``gate``, ``up`` in ``gate_up_proj``); storage order where that says nothing."""
    prefix = len(os.path.commonprefix(list(parts)))
    suffix = len(os.path.commonprefix([p[::-1] for p in parts]))
    telling = [p[prefix : len(p) - suffix] if len(p) - suffix > prefix else p for p in parts]
    rest = whole[prefix:] if whole[:prefix] == parts[0][:prefix] else whole
    where = [rest.find(t) if t and rest.find(t) >= 0 else len(rest) for t in telling]
    return sorted(range(len(parts)), key=lambda i: (where[i], i))


def _order(parts: tuple[str, ...], whole: str, parts_source: Source, whole_source: Source, dim: int) -> list[int] | None:
    """The order of ``parts`` whose concatenation along ``dim`` equals ``whole`` (reads these tensors), or None."""
    tensor = whole_source.load(whole)
    loaded = [parts_source.load(p) for p in parts]
    for order in itertools.permutations(range(len(parts))):
        offset = 0
        for i in order:
            size = loaded[i].shape[dim]
            if not bool((tensor.narrow(dim, offset, size) == loaded[i]).all()):
                break
            offset += size
        else:
            return list(order)
    return None


def _casts(changes: list[Change], ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], names: Any) -> list[dict[str, Any]]:
    """``cast`` rules for B's tensors whose dtype differs from their source's, then one ``quantize`` rule for
    those B stores in a GGML type their source does not: a glob per family where the whole family changes."""
    casts: dict[tuple[tuple[str, ...], str], list[str]] = defaultdict(list)
    quantized: dict[tuple[tuple[str, ...], str], list[str]] = defaultdict(list)
    for c in changes:
        if c.kind not in ("renamed", "moved", "dtype_changed", "shape_changed"):
            continue
        source, target = ma[c.a[0]], mb[c.b[0]]
        if target.stored and target.stored != source.stored:
            quantized[(names(c.b[0])[0], target.stored)].append(c.b[0])
        elif source.dtype != target.dtype:
            casts[(names(c.b[0])[0], target.dtype.name)].append(c.b[0])
    family_sizes: dict[tuple[str, ...], int] = defaultdict(int)
    for key in mb:
        family_sizes[names(key)[0]] += 1

    def patterns(template: tuple[str, ...], keys: list[str]) -> list[str]:
        return [_glob(template)] if family_sizes[template] == len(keys) else keys

    rules: list[dict[str, Any]] = [
        {"cast": {"pattern": p, "dtype": dtype}} for (template, dtype), keys in casts.items() for p in patterns(template, keys)
    ]
    types = {p: qtype for (template, qtype), keys in quantized.items() for p in patterns(template, keys)}
    if types:
        rules.append({"quantize": types})
    return rules


def _render(report: DiffReport, steps: list[dict[str, Any]], notes: list[str], made_by: str) -> str:
    head = [
        f"# Rules that turn A into B, emitted by `{made_by}`: review them before use.",
        f"# A: {report.a}",
        f"# B: {report.b}",
        "# Run: statebridge run THIS_FILE --source A --target OUT",
    ]
    head += [f"# NOTE: {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump({"steps": steps}, sort_keys=False, width=120, default_flow_style=None)


def _check(a: Source, steps: list[dict[str, Any]], mb: Mapping[str, TensorMeta], compared: frozenset[str]) -> list[str]:
    """How the plan of ``steps`` on A differs from B's headers (names, and the ``compared`` of shapes and dtypes); empty when it matches."""
    import statebridge as sb

    try:
        outputs = sb.plan(a, steps).outputs
    except sb.StatebridgeError as e:
        return [f"the rules do not plan against A: {e}"]
    problems = [f"{k}: only in B" for k in mb if k not in outputs]
    problems += [f"{k}: the rules make it, B does not have it" for k in outputs if k not in mb]
    problems += [
        f"{k}: the rules make {outputs[k]}, B has {mb[k]}"
        for k in outputs
        if k in mb and (
            ("shape" in compared and outputs[k].shape != mb[k].shape)
            or ("dtype" in compared and (outputs[k].dtype != mb[k].dtype or outputs[k].stored != mb[k].stored))
        )
    ]
    return problems
