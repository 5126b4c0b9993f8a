"""``statebridge diff A B --content``: the header-only diff checked against the tensors' values.

Headers pair tensors by names and shapes; only the values can say whether a pairing is right.
One streamed pass per side (each file front to back, :data:`~statebridge_analysis.scan.CHUNK`
bytes at a time, never a whole checkpoint) takes every tensor's sha256 (of its bytes as stored,
as ``lint --write-manifest`` does).  Tensors whose pairing that does not settle are read again
for their rows' hashes (sha256, the first 8 bytes kept per row of the first dimension; hashing
4 KB rows one by one costs half as much again as hashing the tensor whole, so only those).  Then:

- a pair whose hashes agree is confirmed (``content equal``);
- tensors left unexplained, or paired by names but not by values, are paired by equal hashes
  (a rename no name similarity finds);
- a 2-D tensor and one of the swapped shape are compared through a bilinear fingerprint
  ``sum_ij u_i v_j bits(x_ij) mod 2**64`` (``u``, ``v`` fixed pseudo-random): the transpose has
  the same value with the weights swapped, so one more streamed read of each candidate decides;
- tensors of one shape whose row hashes are the same multiset are a permutation of rows; the
  rotary interleave of llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) and its
  reverse are recognised by the number of heads;
- what is still paired but differs gets its values compared, both tensors read in lockstep a
  chunk at a time: the largest absolute difference and the cosine similarity.

Only the hashes are kept (32 bytes a tensor, 8 a row where rows were hashed): memory is bounded by
the chunk and the row count.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .diff import _NUMBER, Change, DiffReport, _is_move
from .scan import CHUNK, UINT, Scanner
from .transforms import rotary_permutation

if TYPE_CHECKING:
    from statebridge import Source, TensorMeta

#: elements compared at a time when values are compared (two float64 arrays of this size)
ELEMENTS = CHUNK // 8
#: numpy types of the floats whose values are compared (bfloat16 is widened by hand)
_FLOATS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_INTS = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.uint8}


def _row_bytes(meta: TensorMeta) -> int:
    """Bytes of one row: a 2-D or larger tensor's first dimension indexes rows, anything else is one row."""
    if meta.stored or len(meta.shape) < 2 or meta.shape[0] == 0:
        return 0
    return meta.nbytes // meta.shape[0]


class Reader:
    """One side's tensors, read a chunk at a time through :class:`~statebridge_analysis.scan.Scanner`'s files."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.scanner = Scanner(source)
        self._rows: dict[str, bytes] = {}

    def close(self) -> None:
        self.scanner.close()

    def chunks(self, key: str, meta: TensorMeta, size: int = CHUNK) -> Iterator[memoryview]:
        """The tensor's bytes as stored, in chunks of at most ``size`` bytes (blocks for a quantized GGUF tensor)."""
        span = self.source.raw_span(key) or (self.source.stored_span(key) if meta.stored else None)
        if span is not None:
            yield from self.scanner._chunks(span.path, span.offset, span.length, key, size)
            return
        import torch  # a torch pickle or another reader without spans: the reader holds the tensor anyway

        raw = self.source.load(key).contiguous().reshape(-1).view(torch.uint8).numpy()
        for start in range(0, raw.nbytes, size):
            yield raw[start : start + size].data

    def digest(self, key: str, meta: TensorMeta) -> bytes:
        """The sha256 of the tensor's bytes as stored."""
        whole = hashlib.sha256()
        for chunk in self.chunks(key, meta):
            whole.update(chunk)
        return whole.digest()

    def rows(self, key: str, meta: TensorMeta) -> bytes:
        """The first 8 bytes of each row's sha256, concatenated (one row for a tensor of fewer than two dimensions), remembered."""
        done = self._rows.get(key)
        if done is not None:
            return done
        row = _row_bytes(meta)
        rows = bytearray()
        if row == 0:
            rows += self.digest(key, meta)[:8]
        elif row > CHUNK:  # rows longer than a chunk: each hashed across chunks
            current, filled = hashlib.sha256(), 0
            for chunk in self.chunks(key, meta):
                at = 0
                while at < len(chunk):
                    take = min(row - filled, len(chunk) - at)
                    current.update(chunk[at : at + take])
                    at, filled = at + take, filled + take
                    if filled == row:
                        rows += current.digest()[:8]
                        current, filled = hashlib.sha256(), 0
        else:
            sha = hashlib.sha256
            for chunk in self.chunks(key, meta, CHUNK // row * row):
                for at in range(0, len(chunk), row):
                    rows += sha(chunk[at : at + row]).digest()[:8]
        done = self._rows[key] = bytes(rows)
        return done

    def bilinear(self, key: str, meta: TensorMeta, transposed: bool) -> int:
        """``sum_ij u_i v_j bits(x_ij) mod 2**64`` with ``u`` over rows and ``v`` over columns (swapped when ``transposed``)."""
        m, n = meta.shape
        u, v = (_weights(m, 2), _weights(n, 1)) if transposed else (_weights(m, 1), _weights(n, 2))
        return int(self.fingerprints(key, meta, n, u, v[:, None])[0])

    def fingerprints(self, key: str, meta: TensorMeta, width: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``sum_ij u_i v_jc bits(x_ij) mod 2**64`` for each column ``c`` of ``v``, the tensor's elements seen as rows of
        ``width`` (``u``: one weight a row; ``v``: ``width`` weights a column), in one streamed read."""
        view, done = UINT[meta.dtype.itemsize], 0
        total = np.zeros(v.shape[1], dtype=np.uint64)
        row = width * meta.dtype.itemsize
        with np.errstate(over="ignore"):
            for chunk in self.chunks(key, meta, max(row, CHUNK // row * row)):
                x = np.frombuffer(chunk, dtype=view).reshape(-1, width).astype(np.uint64)
                total += u[done : done + len(x)] @ (x @ v)
                done += len(x)
        return total

    def values(self, key: str, meta: TensorMeta) -> Iterator[np.ndarray]:
        """The tensor's values as float64, :data:`ELEMENTS` at a time (raises KeyError for a type without a known layout)."""
        name = meta.dtype.name
        if meta.stored or (name not in _FLOATS and name not in _INTS and name != "bfloat16"):
            raise KeyError(name)
        size = meta.dtype.itemsize
        for chunk in self.chunks(key, meta, ELEMENTS * size):
            if name == "bfloat16":
                x = (np.frombuffer(chunk, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                x = np.frombuffer(chunk, dtype=_FLOATS.get(name) or _INTS[name])
            yield x.astype(np.float64)


def _weights(length: int, seed: int) -> np.ndarray:
    """Odd pseudo-random 64-bit weights, the same for every run (``seed`` 1 for rows of A's layout, 2 for its columns)."""
    return np.random.default_rng(seed).integers(0, 2**63, size=length, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _elements(values: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Re-chunk to exactly :data:`ELEMENTS` elements (the two sides' chunks may hold different counts of elements)."""
    held = np.empty(0)
    for x in values:
        held = np.concatenate([held, x]) if len(held) else x
        while len(held) >= ELEMENTS:
            yield held[:ELEMENTS]
            held = held[ELEMENTS:]
    if len(held):
        yield held


def compare_values(ra: Reader, ka: str, ma: TensorMeta, rb: Reader, kb: str, mb: TensorMeta) -> tuple[float, float] | None:
    """(largest absolute difference, cosine similarity) of two tensors of one element count, or None when not comparable."""
    if ma.numel != mb.numel:
        return None
    try:
        pairs = zip(_elements(ra.values(ka, ma)), _elements(rb.values(kb, mb)))
        worst, dot, na, nb = 0.0, 0.0, 0.0, 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            for x, y in pairs:
                worst = max(worst, float(np.max(np.abs(x - y))) if len(x) else 0.0)
                dot += float(x @ y)
                na += float(x @ x)
                nb += float(y @ y)
    except KeyError:
        return None
    cosine = dot / (na * nb) ** 0.5 if na and nb else (1.0 if na == nb else 0.0)
    return worst, cosine


def row_order(rows_a: bytes, rows_b: bytes) -> list[int] | None:
    """For each row of B, the row of A it holds (the row hashes of each, 8 bytes a row), or None when B's rows
    are not A's reordered (or not reordered at all).  Equal rows are matched in order."""
    a = [rows_a[i : i + 8] for i in range(0, len(rows_a), 8)]
    b = [rows_b[i : i + 8] for i in range(0, len(rows_b), 8)]
    if len(a) != len(b) or sorted(a) != sorted(b) or a == b:
        return None
    where: dict[bytes, list[int]] = defaultdict(list)
    for i, h in enumerate(a):
        where[h].append(i)
    for held in where.values():
        held.reverse()  # popped from the end: the first of equal rows first
    return [where[h].pop() for h in b]


def rotary_of(order: Sequence[int]) -> tuple[int, bool] | None:
    """(heads, reversed) when ``order`` is llama.cpp's rotary interleave with that many heads, or its reverse; else None."""
    n = len(order)
    for heads in range(1, n // 2 + 1):
        if n % (2 * heads):
            continue
        forward = rotary_permutation(n, heads)
        if all(order[j] == forward[j] for j in range(n)):
            return heads, False
        if all(order[forward[j]] == j for j in range(n)):
            return heads, True
    return None


def describe_order(order: Sequence[int]) -> str:
    """``rows permuted: rotary interleave (heads=4)`` (``reversed``), or which rows moved where."""
    rotary = rotary_of(order)
    if rotary is not None:
        heads, back = rotary
        return f"rows permuted: rotary interleave{' reversed' if back else ''} (heads={heads})"
    moved = sum(1 for j, i in enumerate(order) if i != j)
    shown = ", ".join(f"{j}<-{i}" for j, i in enumerate(order) if i != j)
    return f"rows permuted: {moved} of {len(order)} rows moved ({shown[:60]}{'...' if len(shown) > 60 else ''})"


def describe_permutation(rows_a: bytes, rows_b: bytes) -> str | None:
    """How B's rows are A's rows reordered (the row hashes of each, 8 bytes a row), or None when they are not."""
    order = row_order(rows_a, rows_b)
    return describe_order(order) if order is not None else None


def content_diff(report: DiffReport, a: Source, b: Source) -> DiffReport:
    """The header-only ``report`` of ``a`` against ``b`` with every pairing confirmed or refuted by values."""
    ma, mb = a.metas(), b.metas()
    ra, rb = Reader(a), Reader(b)
    try:
        fa = {k: ra.digest(k, m) for k, m in ma.items()}
        fb = {k: rb.digest(k, m) for k, m in mb.items()}
        return DiffReport(report.a, report.b, _decide(report.changes, ma, mb, fa, fb, ra, rb), report.names)
    finally:
        ra.close()
        rb.close()


def _equal(x: str, y: str, ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], fa: Mapping[str, bytes], fb: Mapping[str, bytes]) -> bool:
    return fa[x] == fb[y] and ma[x].shape == mb[y].shape and ma[x].dtype == mb[y].dtype and ma[x].stored == mb[y].stored


def _decide(
    changes: list[Change], ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta],
    fa: Mapping[str, bytes], fb: Mapping[str, bytes], ra: Reader, rb: Reader,
) -> list[Change]:
    out: list[Change] = []
    loose_a: list[str] = []  # unexplained keys of A: removed, or paired by names where the values refute it
    loose_b: list[str] = []
    disputed: dict[str, Change] = {}  # A's key -> the header pairing the values refuted (kept if nothing better turns up)
    for c in changes:
        if c.kind in ("merged", "split"):
            out.append(_join(c, ma, mb, ra, rb))
        elif c.kind == "removed":
            loose_a.extend(c.a)
        elif c.kind == "added":
            loose_b.extend(c.b)
        elif _equal(c.a[0], c.b[0], ma, mb, fa, fb):
            out.append(c._replace(detail=_with(c.detail, "content equal")))
        else:
            disputed[c.a[0]] = c
            loose_a.append(c.a[0])
            loose_b.append(c.b[0])
    # 1. equal content, whatever the names
    by_content: dict[tuple, list[str]] = defaultdict(list)
    for k in loose_b:
        by_content[(fb[k], mb[k].shape, mb[k].dtype, mb[k].stored)].append(k)
    taken_b: set[str] = set()
    left_a: list[str] = []
    for k in loose_a:
        candidates = [y for y in by_content.get((fa[k], ma[k].shape, ma[k].dtype, ma[k].stored), []) if y not in taken_b]
        if not candidates:
            left_a.append(k)
            continue
        match = k if k in candidates else candidates[0]  # alike tensors (norms of ones): the same name first, then storage order
        taken_b.add(match)
        if match == k:
            out.append(Change("unchanged", (k,), (k,), "content equal"))
        else:  # no confidence: the names decided nothing
            kind = "moved" if _is_move(_template(k), _template(match)) else "renamed"
            out.append(Change(kind, (k,), (match,), "paired by content"))
    left_b = [k for k in loose_b if k not in taken_b]
    # 2. transposes and row permutations among what is left: the header's own pairing first, then any candidate
    transposed = _transposes(left_a, left_b, ma, mb, ra, rb, disputed)
    out.extend(transposed)
    done_a = {c.a[0] for c in transposed}
    done_b = taken_b | {c.b[0] for c in transposed}  # a refuted pair's B key may have found its own partner above
    # rows as a multiset (the hash of the sorted row hashes) find the candidates without comparing every pair
    shapes = {(ma[k].shape, ma[k].dtype) for k in left_a if k not in done_a and _row_bytes(ma[k])}
    rows_of: dict[tuple, list[str]] = defaultdict(list)
    for y in left_b:
        if y not in done_b and (mb[y].shape, mb[y].dtype) in shapes and _row_bytes(mb[y]):
            rows_of[(mb[y].shape, mb[y].dtype, _multiset(rb.rows(y, mb[y])))].append(y)
    for k in left_a:
        if k in done_a or (ma[k].shape, ma[k].dtype) not in shapes:
            continue
        rows_a = ra.rows(k, ma[k])
        candidates = [y for y in rows_of.get((ma[k].shape, ma[k].dtype, _multiset(rows_a)), []) if y not in done_b]
        pair = disputed.get(k)
        y = pair.b[0] if pair is not None and pair.b[0] in candidates else next(iter(candidates), None)
        order = row_order(rows_a, rb.rows(y, mb[y])) if y is not None else None
        if order is not None:
            out.append(Change("permuted", (k,), (y,), describe_order(order), rows=tuple(order)))
            done_a.add(k)
            done_b.add(y)
    # 3. pairs the names made and the values did not confirm: how far their values are apart
    for k in left_a:
        if k in done_a:
            continue
        pair = disputed.get(k)
        if pair is not None and pair.b[0] not in done_b:
            done_a.add(k)
            done_b.add(pair.b[0])
            y = pair.b[0]
            kind = "values_changed" if pair.kind == "unchanged" else pair.kind
            stats = compare_values(ra, k, ma[k], rb, y, mb[y]) if ma[k].shape == mb[y].shape else None
            detail = pair.detail if stats else _with(pair.detail, "content differs")
            out.append(pair._replace(kind=kind, detail=detail, values=stats))
        else:
            out.append(Change("removed", (k,), ()))
    out.extend(Change("added", (), (k,)) for k in left_b if k not in done_b)
    order_a = {k: i for i, k in enumerate(ma)}
    order_b = {k: i for i, k in enumerate(mb)}
    out.sort(key=lambda c: (order_a[c.a[0]], 0) if c.a else (len(order_a), order_b[c.b[0]]))
    return out


def _multiset(rows: bytes) -> bytes:
    """The same for any order of the same rows."""
    return hashlib.sha256(b"".join(sorted(rows[i : i + 8] for i in range(0, len(rows), 8)))).digest()


def _template(key: str) -> tuple[str, ...]:
    return tuple(_NUMBER.split(key)[0::2])


def _with(detail: str, note: str) -> str:
    return f"{detail}; {note}" if detail else note


def _transposes(
    left_a: list[str], left_b: list[str], ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta],
    ra: Reader, rb: Reader, disputed: Mapping[str, Change],
) -> list[Change]:
    """2-D tensors of A whose transpose is a tensor of B (same element type): a bilinear fingerprint of each candidate.

    Square ones too, which headers cannot tell from an untransposed tensor: a transposed square weight under its
    own name (or another) is paired here before its values are called changed."""
    swapped: dict[tuple, list[str]] = defaultdict(list)
    for y in left_b:
        m = mb[y]
        if len(m.shape) == 2 and not m.stored and m.numel:  # square ones too: only values tell them; empty: nothing to tell
            swapped[(m.shape[1], m.shape[0], m.dtype)].append(y)
    out: list[Change] = []
    prints_b: dict[str, int] = {}
    taken: set[str] = set()
    for k in left_a:
        m = ma[k]
        candidates = swapped.get((m.shape[0], m.shape[1], m.dtype), []) if len(m.shape) == 2 and not m.stored else []
        candidates = [y for y in candidates if y not in taken]
        if not candidates:
            continue
        mine = ra.bilinear(k, m, transposed=False)
        for y in candidates:
            if y not in prints_b:
                prints_b[y] = rb.bilinear(y, mb[y], transposed=True)
            if prints_b[y] == mine:
                taken.add(y)
                pair = disputed.get(k)
                note = "content equal, transposed" if pair is not None and pair.b[0] == y else "paired by content, transposed"
                out.append(Change("transposed", (k,), (y,), f"{list(m.shape)} -> {list(mb[y].shape)}; {note}"))
                break
    return out


def _join(c: Change, ma: Mapping[str, TensorMeta], mb: Mapping[str, TensorMeta], ra: Reader, rb: Reader) -> Change:
    """A merge or split is confirmed when the whole's values are the parts' joined in some order, which is named:
    along dim 0 by row hashes, along another dim by bilinear fingerprints."""
    parts, whole = (c.a, c.b[0]) if c.kind == "merged" else (c.b, c.a[0])
    mp, mw = (ma, mb) if c.kind == "merged" else (mb, ma)
    rp, rw = (ra, rb) if c.kind == "merged" else (rb, ra)
    if any(mp[p].dtype != mw[whole].dtype or mp[p].stored for p in parts) or mw[whole].stored or c.dim is None:
        return c._replace(detail=_with(c.detail, "content not checked (block-quantized or cast)"))
    if c.dim != 0 or any(_row_bytes(mp[p]) == 0 for p in parts) or _row_bytes(mw[whole]) == 0:
        order = _columns_order(parts, whole, mp, mw, rp, rw, c.dim)
    else:
        order = _rows_order(parts, whole, mp, mw, rp, rw)
    if order is None:
        return c._replace(detail=_with(c.detail, "content differs"))
    if not order:
        return c._replace(detail=_with(c.detail, f"content not checked (more than {MOST_ORDERED} parts)"))
    names = ", ".join(p.rsplit(".", 2)[-2] for p in order)
    return c._replace(detail=_with(c.detail, f"content equal, in the order {names}"))


#: the most parts of a join along a dim other than 0 whose orders are tried (each order is a sum of fingerprints)
MOST_ORDERED = 6


def _rows_order(parts, whole, mp, mw, rp: Reader, rw: Reader) -> list[str] | None:
    """The parts in the order whose rows, laid end to end, are the whole's rows (row hashes), or None."""
    rows = rw.rows(whole, mw[whole])
    of = {p: rp.rows(p, mp[p]) for p in parts}
    at, order = 0, []
    remaining = list(parts)
    while remaining:
        found = next((p for p in remaining if rows[at : at + len(of[p])] == of[p]), None)
        if found is None:
            return None
        order.append(found)
        remaining.remove(found)
        at += len(of[found])
    return order


def _columns_order(parts, whole, mp, mw, rp: Reader, rw: Reader, dim: int) -> list[str] | None:
    """The parts in the order whose concatenation along ``dim`` is the whole, or None; ``[]`` when not tried.

    Each tensor is seen as rows of the elements from ``dim`` on (``outer`` rows: the product of the dims before):
    the whole's row is the parts' rows side by side.  A bilinear fingerprint with weights ``u`` over the rows and
    ``v`` over the whole's columns is, for the whole, the sum of each part's fingerprint with the slice of ``v``
    where that part stands; each part is read once for every place it could stand (after any subset of the others).
    """
    if len(parts) > MOST_ORDERED:
        return []
    shape = mw[whole].shape
    outer = int(np.prod(shape[:dim], dtype=np.int64))
    inner = int(np.prod(shape[dim + 1 :], dtype=np.int64))
    widths = {p: mp[p].shape[dim] * inner for p in parts}
    u, v = _weights(outer, 1), _weights(shape[dim] * inner, 2)
    target = rw.fingerprints(whole, mw[whole], shape[dim] * inner, u, v[:, None])[0]
    prints: dict[str, dict[int, np.uint64]] = {}
    for p in parts:
        others = [widths[o] for o in parts if o != p]
        offsets = sorted({sum(s) for n in range(len(others) + 1) for s in itertools.combinations(others, n)})
        columns = np.stack([v[at : at + widths[p]] for at in offsets], axis=1)
        prints[p] = dict(zip(offsets, rp.fingerprints(p, mp[p], widths[p], u, columns)))
    for order in itertools.permutations(parts):
        at, total = 0, np.uint64(0)
        with np.errstate(over="ignore"):
            for p in order:
                total += prints[p][at]
                at += widths[p]
        if total == target:
            return list(order)
    return None
