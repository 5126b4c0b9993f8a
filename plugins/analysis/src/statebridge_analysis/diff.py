"""``statebridge diff A B``: how the tensors of B relate to those of A, from headers alone.

Every key of A and of B ends in exactly one change (nothing is left unexplained):

``unchanged``      the same key, shape and dtype on both sides
``moved``          the same name under a new prefix (``model.`` dropped), or the same name with its
                   layer indices shifted (``layers.{0..3}`` -> ``layers.{2..5}``)
``renamed``        another name, the same shapes (a family of keys at a time: the same layer indices,
                   possibly shifted), with a confidence from name similarity
``merged``         several tensors of A are, by shapes, one tensor of B concatenated along a dim
``split``          one tensor of A is, by shapes, several tensors of B
``dtype_changed``  the same key, another dtype (a quantized type counts: ``float32 (stored Q4_K)``)
``shape_changed``  the same key, another shape
``removed``        only in A;  ``added``: only in B

A rename, move, merge or split is a hypothesis drawn from names and shapes: headers cannot
tell two tensors of one shape apart, so the confidence says how much the names decided.

The work is linear in the keys: keys are grouped into families (the same name, other layer
numbers), families are paired within buckets of the same member count and shapes, and only
a pair about to be accepted is checked member by member.  Merges and splits are searched
among what is left, per layer (the same layer numbers), in buckets of at most
:data:`MAX_GROUP` keys a side.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from statebridge.tensors.patterns import number_range, shown

if TYPE_CHECKING:
    from statebridge import Source, TensorMeta

#: a dotted component that is a layer number (as :data:`statebridge.tensors.patterns.NUMBER`), captured
_NUMBER = re.compile(r"(?<![^.])(0|[1-9]\d{0,17})(?![^.])")
#: the most keys a side of one layer may hold for the merge and split search (subsets of them are tried)
MAX_GROUP = 12
#: the largest number of parts a merge or split is searched for beyond "all that fit"
MAX_PARTS = 4
KINDS = (
    "unchanged", "moved", "renamed", "merged", "split", "transposed", "permuted", "values_changed",
    "dtype_changed", "shape_changed", "removed", "added",
)

#: Hugging Face, llama.cpp (GGUF) and Meta's original Llama component names, each as the words it means, so
#: that ``model.layers.0.self_attn.q_proj.weight``, ``blk.0.attn_q.weight`` and ``layers.0.attention.wq.weight`` read alike
_COMPONENTS = {
    "token_embd": "embed token", "embed_tokens": "embed token", "wte": "embed token", "tok_embeddings": "embed token",
    "wq": "attn q", "wk": "attn k", "wv": "attn v", "wo": "attn o", "attention_norm": "attn norm",
    "w1": "ffn gate", "w3": "ffn up", "w2": "ffn down",
    "output_norm": "final norm", "norm": "final norm", "ln_f": "final norm",
    "output": "lm head", "lm_head": "lm head",
    "attn_q": "attn q", "q_proj": "attn q", "attn_k": "attn k", "k_proj": "attn k",
    "attn_v": "attn v", "v_proj": "attn v", "attn_output": "attn o", "o_proj": "attn o",
    "attn_qkv": "attn qkv", "qkv_proj": "attn qkv",
    "attn_norm": "attn norm", "input_layernorm": "attn norm",
    "ffn_norm": "ffn norm", "post_attention_layernorm": "ffn norm",
    "ffn_gate": "ffn gate", "gate_proj": "ffn gate", "ffn_up": "ffn up", "up_proj": "ffn up",
    "ffn_down": "ffn down", "down_proj": "ffn down", "gate_up_proj": "ffn gate up",
    "blk": "layers", "layer": "layers", "h": "layers", "block": "layers", "blocks": "layers",
    "self_attn": "attn", "attention": "attn", "mlp": "ffn", "feed_forward": "ffn",
}
#: words that say nothing about what a tensor is (every layer's tensors have ``layers``, ``#``, ``weight``)
_NOISE = {"model", "self", "proj", "transformer", "", "#", "layers", "weight"}


class Change(NamedTuple):
    """How some keys of A relate to some keys of B (a named tuple: a diff of 100,000 keys makes 100,000 of them)."""

    kind: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    detail: str = ""
    #: for renames and moves: 0..1, how much the names (not just the shapes) decided the pairing
    confidence: float | None = None
    #: the family templates of ``a`` and ``b`` when the diff paired whole families (saves splitting names again)
    family: tuple[Any, ...] | None = None
    #: for merges and splits: the dimension joined along
    dim: int | None = None
    #: with ``--content``, for a pair whose values differ: (largest absolute difference, cosine similarity)
    values: tuple[float, float] | None = None
    #: with ``--content``, for a permutation of rows: for each row of B, the row of A it holds
    rows: tuple[int, ...] | None = None


class Names:
    """Each key's family template and layer numbers (as text), split once and remembered."""

    def __init__(self) -> None:
        self.memo: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __call__(self, key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        found = self.memo.get(key)
        if found is None:
            parts = _NUMBER.split(key)
            found = self.memo[key] = (tuple(parts[0::2]), tuple(parts[1::2]))
        return found


class FamilyChange(NamedTuple):
    """A whole family of A paired with one of B (renamed or moved): one object for its thousands of keys."""

    kind: str
    detail: str
    confidence: float
    #: ((A's template,), (B's template,))
    family: tuple[Any, ...]
    #: (key of A, key of B), in A's order
    pairs: list[tuple[str, str]]
    #: the layer numbers of A's keys and of B's (as text), for folding without splitting the names again
    numbers: tuple[list[tuple[str, ...]], list[tuple[str, ...]]]

    @property
    def a(self) -> tuple[str, ...]:
        """The first pair's key of A (where the family sorts)."""
        return (self.pairs[0][0],)

    def expand(self) -> Iterable[Change]:
        return (Change(self.kind, (x,), (y,), self.detail, self.confidence, self.family) for x, y in self.pairs)


class _Row:
    """A folded row being gathered: each side's layer numbers per part, how many changes, the lowest confidence."""

    __slots__ = ("a", "b", "count", "confidence", "values")

    def __init__(self, parts_a: int, parts_b: int) -> None:
        self.a: list[list[tuple[str, ...]]] = [[] for _ in range(parts_a)]
        self.b: list[list[tuple[str, ...]]] = [[] for _ in range(parts_b)]
        self.count = 0
        self.confidence: float | None = None
        #: the largest absolute difference and the lowest cosine of the row's pairs (``--content``)
        self.values: tuple[float, float] | None = None

    def seen(self, confidence: float | None, values: tuple[float, float] | None = None) -> None:
        if confidence is not None and (self.confidence is None or confidence < self.confidence):
            self.confidence = confidence
        if values is not None:
            self.values = values if self.values is None else (max(self.values[0], values[0]), min(self.values[1], values[1]))


@dataclass
class DiffReport:
    """A diff's changes (single keys, joins, and whole families paired at once), with the names split once for folding."""

    a: str
    b: str
    items: list[Change | FamilyChange]
    names: Names

    @property
    def changes(self) -> list[Change]:
        """Every change key by key (families expanded), in the order of :attr:`items`."""
        return [c for item in self.items for c in (item.expand() if isinstance(item, FamilyChange) else (item,))]

    def counts(self) -> dict[str, int]:
        """Keys per kind, counted on A's side (B's for ``added``)."""
        counts: Counter[str] = Counter()
        for c in self.items:
            counts[c.kind] += len(c.pairs) if isinstance(c, FamilyChange) else len(c.b) if c.kind == "added" else len(c.a)
        return {kind: counts.get(kind, 0) for kind in KINDS}

    def groups(self, skip: frozenset[str] = frozenset()) -> dict[tuple[Any, ...], list[Change]]:
        """Changes by (kind, detail, A's templates, B's templates): those whose keys differ only in layer numbers."""
        names = self.names
        groups: dict[tuple[Any, ...], list[Change]] = {}
        for c in self.changes:
            if c.kind in skip:
                continue
            family = c.family or (tuple(names(k)[0] for k in c.a), tuple(names(k)[0] for k in c.b))
            groups.setdefault((c.kind, c.detail, *family), []).append(c)
        return groups

    def folded(self, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """One row per group of :meth:`groups` (``model.layers.{0..31}.q.weight -> blk.{0..31}.attn_q.weight``), in the order first seen.

        Gathered from :attr:`items` without expanding families: a family adds its layer numbers in one pass.
        """
        names = self.names
        rows: dict[tuple[Any, ...], _Row] = {}
        for item in self.items:
            if item.kind in skip:
                continue
            if isinstance(item, FamilyChange):
                key = (item.kind, item.detail, *item.family)
                row = rows.get(key) or rows.setdefault(key, _Row(1, 1))
                row.a[0].extend(item.numbers[0])
                row.b[0].extend(item.numbers[1])
                row.count += len(item.pairs)
            else:
                family = item.family or (tuple(names(k)[0] for k in item.a), tuple(names(k)[0] for k in item.b))
                key = (item.kind, item.detail, *family)
                row = rows.get(key) or rows.setdefault(key, _Row(len(item.a), len(item.b)))
                for i, k in enumerate(item.a):
                    row.a[i].append(names(k)[1])
                for i, k in enumerate(item.b):
                    row.b[i].append(names(k)[1])
                row.count += 1
            row.seen(item.confidence, None if isinstance(item, FamilyChange) else item.values)
        return [
            {
                "kind": kind,
                "a": " + ".join(self._fold(t, numbers) for t, numbers in zip(templates_a, row.a)),
                "b": " + ".join(self._fold(t, numbers) for t, numbers in zip(templates_b, row.b)),
                "count": row.count,
                "detail": detail,
                **({"confidence": row.confidence} if row.confidence is not None else {}),
                **({"max_abs_diff": row.values[0], "cosine": row.values[1]} if row.values is not None else {}),
            }
            for (kind, detail, templates_a, templates_b), row in rows.items()
        ]

    @staticmethod
    def _fold(template: tuple[str, ...], numbers: list[tuple[str, ...]]) -> str:
        """One family's keys as one pattern: each layer-number position as a value, a range or a list."""
        columns = [number_range(sorted(map(int, {n[j] for n in numbers}))) for j in range(len(template) - 1)]  # dedupe the text first
        return shown(template[0] + "".join(c + piece for c, piece in zip(columns, template[1:])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "counts": self.counts(),
            "folded": self.folded(),
            "changes": [
                {
                    "kind": c.kind, "a": list(c.a), "b": list(c.b), "detail": c.detail,
                    **({"confidence": c.confidence} if c.confidence is not None else {}),
                    **({"max_abs_diff": c.values[0], "cosine": c.values[1]} if c.values is not None else {}),
                }
                for c in self.changes
            ],
        }

    def render(self) -> str:
        """The folded rows by kind (unchanged tensors only counted), then the counts."""
        lines = [f"A: {self.a}", f"B: {self.b}"]
        rows = self.folded(skip=frozenset({"unchanged"}))
        for kind in KINDS:
            for row in (r for r in rows if r["kind"] == kind):
                arrow = row["a"] if kind == "removed" else row["b"] if kind == "added" else f"{row['a']} -> {row['b']}"
                extra = [row["detail"]] if row["detail"] else []
                if "confidence" in row:
                    extra.append(f"confidence {row['confidence']:.2f}")
                if "cosine" in row:
                    extra.append(values_text(row["max_abs_diff"], row["cosine"]))
                lines.append(f"  {kind:<13} {arrow}" + (f"  ({'; '.join(extra)})" if extra else ""))
        counts = self.counts()
        lines.append(", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items() if n) or "both are empty")
        return "\n".join(lines)


def values_text(max_abs_diff: float, cosine: float) -> str:
    """``values differ: max abs diff 0.5, cosine 1 - 1.2e-09`` (a cosine that rounds to 1 still says how far it
    is from 1), or ``values equal`` (a cast that lost nothing: the same numbers in another dtype)."""
    if max_abs_diff == 0:
        return "values equal"
    close = f"1 - {1 - cosine:.2g}" if 0 < 1 - cosine < 5e-7 else f"{cosine:.6f}"
    return f"values differ: max abs diff {max_abs_diff:.3g}, cosine {close}"


def _kind_of(meta: TensorMeta) -> str:
    """A tensor's element type as diff compares it: its dtype, and the quantized type it is stored in."""
    return f"{meta.dtype.name} (stored {meta.stored})" if meta.stored else meta.dtype.name


@lru_cache(maxsize=1 << 16)
def _words(template: tuple[str, ...]) -> frozenset[str]:
    """The words of a family's name, Hugging Face and llama.cpp spellings made alike (see :data:`_COMPONENTS`)."""
    words = set()
    for component in ".#.".join(template).split("."):
        for word in _COMPONENTS.get(component, component).replace("_", " ").split(" "):
            words.update(_COMPONENTS.get(word, word).split(" "))
    return frozenset(words - _NOISE)


def similarity(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """Dice coefficient of the sets of the two names' telling words (0: nothing in common, 1: the same words);
    halved when the last components differ (a ``weight`` is not a ``bias``)."""
    wa, wb = _words(a), _words(b)
    score = 2 * len(wa & wb) / (len(wa) + len(wb)) if wa or wb else 1.0
    return score if a[-1].rsplit(".", 1)[-1] == b[-1].rsplit(".", 1)[-1] else score / 2


class _Family:
    """Keys of one side that differ only in layer numbers: numbers (as text) -> key."""

    __slots__ = ("template", "members")

    def __init__(self, template: tuple[str, ...]) -> None:
        self.template = template
        self.members: dict[tuple[str, ...], str] = {}


def _families(keys: Iterable[str]) -> dict[tuple[str, ...], _Family]:
    """The keys by family; the loop that sees every key of both sides, so no memo and no calls in it."""
    out: dict[tuple[str, ...], _Family] = {}
    split = _NUMBER.split
    for key in keys:
        parts = split(key)
        template = tuple(parts[0::2])
        family = out.get(template)
        if family is None:
            family = out[template] = _Family(template)
        family.members[tuple(parts[1::2])] = key
    return out


def _shifted(numbers: tuple[str, ...], shift: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(str(int(n) + s) for n, s in zip(numbers, shift))


def _offset(a: _Family, b: _Family) -> tuple[int, ...] | None:
    """The shift of layer numbers that takes every member of ``a`` to a member of ``b`` (all zero: none), or None."""
    if len(a.members) != len(b.members) or len(a.template) != len(b.template):
        return None
    width = len(a.template) - 1
    if a.members.keys() == b.members.keys():
        return (0,) * width
    lows_a = [min(int(n[j]) for n in a.members) for j in range(width)]
    lows_b = [min(int(n[j]) for n in b.members) for j in range(width)]
    shift = tuple(y - x for x, y in zip(lows_a, lows_b))
    if not all(_shifted(numbers, shift) in b.members for numbers in a.members):
        return None
    return shift


def _partners(a: _Family, b: _Family, shift: tuple[int, ...]) -> Iterable[tuple[str, str]]:
    """(key of A, key of B) for each member of ``a`` and its partner in ``b`` under ``shift``."""
    bm = b.members
    if any(shift):
        return ((key, bm[_shifted(numbers, shift)]) for numbers, key in a.members.items())
    return ((key, bm[numbers]) for numbers, key in a.members.items())


def _aligned(pairs: list[tuple[str, str]], ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta]) -> bool:
    return all(ma[x].shape == mb[y].shape for x, y in pairs)


def compare(a: Source, b: Source) -> DiffReport:
    """The diff of two opened sources (headers only): what ``statebridge diff A B`` prints."""
    names = Names()
    return DiffReport(a.name, b.name, diff(a.metas(), b.metas(), names), names)


def diff(
    ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], names: Names | None = None, shapes_known: bool = True
) -> list[Change | FamilyChange]:
    """Every key of ``ma`` and ``mb`` in exactly one change (a :class:`Change`, or a :class:`FamilyChange` for
    a family paired whole), ordered by each one's first key of A in A's storage order, then B's (added).

    ``shapes_known=False`` (``automap`` against a list of names: every shape given as ``()``): shapes tell
    nothing, so a pair is never accepted for being the only one its shapes allow; names decide alone."""
    names = names or Names()
    changes: list[Change | FamilyChange] = []
    fa = _families(k for k in ma if k not in mb)
    fb = _families(k for k in mb if k not in ma)
    claimed = _shifts(fa, fb, ma, mb, changes)
    for key, meta in ma.items():
        other = mb.get(key)
        if other is None or key in claimed:
            continue
        if other.shape != meta.shape:
            changes.append(Change("shape_changed", (key,), (key,), f"{list(meta.shape)} -> {list(other.shape)}" + _transposed(meta, other)))
        elif other.dtype != meta.dtype or other.stored != meta.stored:
            changes.append(Change("dtype_changed", (key,), (key,), f"{_kind_of(meta)} -> {_kind_of(other)}"))
        else:
            changes.append(Change("unchanged", (key,), (key,)))
    # names first where they agree, then shapes (a fusion can give a tensor the shape of an unrelated one),
    # then whatever shapes alone still pair
    _pair_families(fa, fb, ma, mb, changes, min_score=0.5)
    left_a = [k for f in fa.values() for k in f.members.values()]
    left_b = [k for f in fb.values() for k in f.members.values()]
    used_a, used_b = _joins(left_a, left_b, ma, mb, names, changes)
    fa = _families(k for k in left_a if k not in used_a)
    fb = _families(k for k in left_b if k not in used_b)
    _pair_families(fa, fb, ma, mb, changes, min_score=0.3, shapes_known=shapes_known)
    changes.extend(Change("removed", (k,), ()) for f in fa.values() for k in f.members.values())
    changes.extend(Change("added", (), (k,)) for f in fb.values() for k in f.members.values())
    order_a = {k: i for i, k in enumerate(ma)}
    order_b = {k: i for i, k in enumerate(mb)}
    changes.sort(key=lambda c: (order_a[c.a[0]], 0) if c.a else (len(order_a), order_b[c.b[0]]))
    return changes


def _transposed(a: TensorMeta, b: TensorMeta) -> str:
    return " (transposed?)" if len(a.shape) > 1 and a.shape == tuple(reversed(b.shape)) else ""


def _shifts(fa: dict, fb: dict, ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], changes: list) -> set[str]:
    """Families present on both sides whose layer numbers all moved by one shift (``layers.{0..3}`` -> ``{2..5}``).

    Their keys are partly common to A and B by name, so the whole family is gathered from both
    sides; the common keys are claimed here (returned) rather than called unchanged.
    """
    claimed: set[str] = set()
    both = [t for t in fa if t in fb]
    if not both:
        return claimed
    all_a, all_b = _families(ma), _families(mb)  # every key, only when some family is on both sides
    for template in both:
        whole_a, whole_b = all_a[template], all_b[template]
        shift = _offset(whole_a, whole_b)
        if not shift or not any(shift):
            continue
        pairs = list(_partners(whole_a, whole_b, shift))
        if not _aligned(pairs, ma, mb):
            continue
        _add_family(changes, "moved", _shift_text(shift), 1.0, (whole_a, whole_b), pairs, ma, mb)
        for key, other in pairs:
            claimed.update((key, other))
        del fa[template], fb[template]
    return claimed


def _shift_text(shift: tuple[int, ...]) -> str:
    return "layer " + ", ".join(f"{s:+d}" for s in shift) if any(shift) else ""


def _dtype_text(a: TensorMeta, b: TensorMeta) -> str:
    if a.dtype is b.dtype and a.stored == b.stored:
        return ""
    ka, kb = _kind_of(a), _kind_of(b)
    return "" if ka == kb else f"{ka} -> {kb}"


def _join_details(*details: str) -> str:
    return "; ".join(d for d in details if d)


def _signature(family: _Family, metas: Mapping[str, TensorMeta]) -> tuple[Any, ...]:
    return (len(family.members), len(family.template), tuple(sorted(Counter(metas[k].shape for k in family.members.values()).items())))


def _pair_families(
    fa: dict, fb: dict, ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], changes: list, min_score: float,
    shapes_known: bool = True,
) -> None:
    """Pair A's leftover families with B's: same member count and shapes, layer numbers aligned (maybe shifted), best names first.

    A pair needs ``min_score`` of name similarity, unless it is the only pair its shapes allow after the
    first pass (``min_score`` below 0.5): then the shapes decided, and the confidence says how little the names did.
    """
    buckets: dict[tuple[Any, ...], tuple[list[_Family], list[_Family]]] = defaultdict(lambda: ([], []))
    for family in fa.values():
        buckets[_signature(family, ma)][0].append(family)
    for family in fb.values():
        buckets[_signature(family, mb)][1].append(family)
    for side_a, side_b in buckets.values():
        if not side_a or not side_b:
            continue
        unique = shapes_known and len(side_a) == 1 and len(side_b) == 1
        scored = sorted(
            ((similarity(a.template, b.template), i, j) for i, a in enumerate(side_a) for j, b in enumerate(side_b)),
            key=lambda s: (-s[0], s[1], s[2]),
        )
        done_a: set[int] = set()
        done_b: set[int] = set()
        for score, i, j in scored:
            if i in done_a or j in done_b or (score < min_score and not (unique and min_score < 0.5)):
                continue
            a, b = side_a[i], side_b[j]
            shift = _offset(a, b)
            if shift is None:
                continue
            pairs = list(_partners(a, b, shift))
            if not _aligned(pairs, ma, mb):
                continue
            done_a.add(i)
            done_b.add(j)
            kind = "moved" if _is_move(a.template, b.template) else "renamed"
            confidence = round((1 + score) / 2 if unique else score, 2)
            _add_family(changes, kind, _shift_text(shift), confidence, (a, b), pairs, ma, mb)
            del fa[a.template], fb[b.template]


def _add_family(
    changes: list, kind: str, detail: str, confidence: float, families: tuple[_Family, _Family], pairs: list[tuple[str, str]],
    ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta],
) -> None:
    """One :class:`FamilyChange` when every pair keeps its element type, else one :class:`Change` per pair (saying which)."""
    a, b = families
    family = ((a.template,), (b.template,))
    if all(ma[x].dtype is mb[y].dtype and ma[x].stored == mb[y].stored for x, y in pairs):
        changes.append(FamilyChange(kind, detail, confidence, family, pairs, (list(a.members), list(b.members))))
        return
    for x, y in pairs:
        dtype = _dtype_text(ma[x], mb[y])
        changes.append(Change(kind, (x,), (y,), _join_details(detail, dtype) if dtype else detail, confidence, family))


def _is_move(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """The same leaf under another prefix: the same name from the first layer number on
    (``model.layers.#.w`` / ``decoder.layers.#.w``), or, without numbers, one name ending the other
    from a dot on (``model.norm.weight`` / ``norm.weight``)."""
    if len(a) > 1:
        return a[1:] == b[1:]
    short, long = sorted((a[0], b[0]), key=len)
    return long.endswith("." + short)


def _joins(
    left_a: list[str], left_b: list[str], ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], names: Names, changes: list
) -> tuple[set[str], set[str]]:
    """Merges (several of A = one of B) and splits (one of A = several of B) among the leftovers, per layer numbers."""
    by_layer_a: dict[tuple[str, ...], list[str]] = defaultdict(list)
    by_layer_b: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for key in left_a:
        by_layer_a[names(key)[1]].append(key)
    for key in left_b:
        by_layer_b[names(key)[1]].append(key)
    used_a: set[str] = set()
    used_b: set[str] = set()
    for layer, keys_a in by_layer_a.items():
        keys_b = by_layer_b.get(layer)
        if not keys_b or len(keys_a) > MAX_GROUP or len(keys_b) > MAX_GROUP:
            continue
        candidates = [("merged", *c) for c in _concatenations(keys_b, keys_a, mb, ma, names)]
        candidates += [("split", *c) for c in _concatenations(keys_a, keys_b, ma, mb, names)]
        candidates.sort(key=lambda c: -c[1])  # the names decide between joins the shapes allow alike (stable: storage order)
        for kind, _, whole, parts, dim in candidates:
            used_w, used_p = (used_b, used_a) if kind == "merged" else (used_a, used_b)
            if whole in used_w or used_p.intersection(parts):
                continue
            used_w.add(whole)
            used_p.update(parts)
            if kind == "merged":
                changes.append(Change("merged", parts, (whole,), f"concatenated along dim {dim}: sizes {[ma[p].shape[dim] for p in parts]}", dim=dim))
            else:
                changes.append(Change("split", (whole,), parts, f"along dim {dim}: sizes {[mb[p].shape[dim] for p in parts]}", dim=dim))
    return used_a, used_b


def _concatenations(
    wholes: list[str], parts: list[str], mw: Mapping[str, TensorMeta], mp: Mapping[str, TensorMeta], names: Names
) -> Iterable[tuple[float, str, tuple[str, ...], int]]:
    """(name score, whole, parts, dim) for each way a tensor of ``wholes`` has the shape of some ``parts``
    joined along one dim: every part that fits, or up to :data:`MAX_PARTS` of them (parts in storage order)."""
    for whole in wholes:
        meta = mw[whole]
        template = names(whole)[0]
        for dim in range(len(meta.shape)):
            fit = [
                p for p in parts
                if _kind_of(mp[p]) == _kind_of(meta) and len(mp[p].shape) == len(meta.shape)
                and mp[p].shape[:dim] == meta.shape[:dim] and mp[p].shape[dim + 1 :] == meta.shape[dim + 1 :]
                and mp[p].shape[dim] < meta.shape[dim]
            ]
            smaller = (c for n in range(2, min(MAX_PARTS, len(fit) - 1) + 1) for c in itertools.combinations(fit, n))
            subsets = dict.fromkeys(itertools.chain([tuple(fit)], smaller))  # ordered: the same report every run
            for subset in subsets:
                if len(subset) >= 2 and sum(mp[p].shape[dim] for p in subset) == meta.shape[dim]:
                    score = sum(similarity(template, names(p)[0]) for p in subset) / len(subset)
                    yield score, whole, subset, dim
