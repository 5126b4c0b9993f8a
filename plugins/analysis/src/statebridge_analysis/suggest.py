"""Did you mean: the target keys nearest to keys a pipeline made that the target does not want.

The plugin's answer to the core's ``suggest_keys`` hook, raised when a strict ``load_into`` or a
``require: {no_missing, no_extra}`` check fails.  Nearness is the diff's and automap's: keys are
taken a family at a time (the same name but for layer numbers), a candidate family scores the
better of the diff's word similarity (:func:`statebridge_analysis.diff.similarity`: Hugging Face
and llama.cpp spellings alike, so ``blk.0.attn_q.weight`` is near ``model.layers.0.self_attn.q_proj.weight``)
and the characters' similarity (a typo: ``q_prj``), and the shape decides between equals: a
candidate of the same shape scores a quarter more, one of another shape half as much.  Within the
chosen family, the member with the same layer numbers is suggested.

Bounded: at most :data:`MOST_FAMILIES` families of unmatched keys get suggestions (the error shows
a few); when the candidates have more than :data:`CLOSEST` families, only those sharing a word with
the unmatched family are scored, and characters are compared with the :data:`CLOSEST` best by words.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .diff import _families, _words, similarity

#: unmatched families that get suggestions (the core's error shows five keys)
MOST_FAMILIES = 50
#: candidate families compared character by character when there are more
CLOSEST = 200
#: the least score a suggestion needs
LEAST = 0.45
#: a suggestion beside the best needs this share of the best's score (``q_proj``, not also ``o_proj``)
CLOSE = 0.95
#: candidate families per unmatched family whose members are looked at (the best by name)
BEST = 5


def nearest(unmatched: Mapping[str, Any], candidates: Mapping[str, Any], n: int = 3) -> dict[str, list[str]]:
    """``{unmatched key: [candidate keys, best first]}`` (at most ``n`` each); keys with nothing near are left out."""
    theirs = list(_families(candidates).values())
    by_word: dict[str, list[int]] = defaultdict(list)  # only consulted when there are many candidate families
    if len(theirs) > CLOSEST:
        for i, f in enumerate(theirs):
            for word in _words(f.template):
                by_word[word].append(i)
    out: dict[str, list[str]] = {}
    for family in list(_families(unmatched).values())[:MOST_FAMILIES]:
        mine = "#".join(family.template)
        considered = sorted({i for w in _words(family.template) for i in by_word.get(w, ())}) if by_word else range(len(theirs))
        words = sorted(((similarity(family.template, theirs[i].template), i) for i in considered), key=lambda s: -s[0])
        chars = {i: difflib.SequenceMatcher(None, mine, "#".join(theirs[i].template)).ratio() for _, i in words[:CLOSEST]}
        names = dict(sorted(((i, max(score, chars.get(i, 0.0))) for score, i in words), key=lambda s: -s[1])[:BEST])
        if not names:
            continue
        for numbers, key in family.members.items():
            meta = unmatched[key]
            scored = []
            for i, name_score in names.items():
                other = theirs[i]
                partner = other.members.get(numbers) or next(iter(other.members.values()))
                scored.append((name_score * _shape_factor(meta, candidates[partner]), partner))
            scored.sort(key=lambda s: (-s[0], s[1]))
            near = [k for score, k in scored[:n] if score >= max(LEAST, CLOSE * scored[0][0])]
            if near:
                out[key] = near
    return out


def _shape_factor(a: Any, b: Any) -> float:
    """1.25 for the same shape, 0.5 for another, 1 when either is unknown (a key list of names)."""
    if a is None or b is None:
        return 1.0
    return 1.25 if tuple(a.shape) == tuple(b.shape) else 0.5
