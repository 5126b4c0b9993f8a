"""Finding a checkpoint's numbered blocks from its tensor names, and re-indexing per-layer config lists.

Growth works on the stack of numbered blocks (``model.layers.N.…``, ``transformer.h.N.…``,
``blocks.N.…``).  Which prefix numbers the decoder's blocks is read from the names alone, so
a plan needs headers only; a checkpoint with two stacks (a vision tower beside the text
decoder) must name the one to grow with ``prefix``, since guessing would grow the wrong one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import statebridge as sb

#: ``<prefix>.<N>.<rest>`` where the prefix ends in a name transformers uses for its block stacks
LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<index>0|[1-9]\d*)\.(?P<rest>.+)$")
#: config.json keys that count the blocks, by family (Llama and most: num_hidden_layers; GPT-2: n_layer)
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Stack:
    """The numbered blocks of a checkpoint: their prefix, count, and each block's keys (the rest after ``prefix.N.``)."""

    prefix: str
    count: int
    #: block index -> [(full key, rest)], in the checkpoint's order
    keys: Mapping[int, list[tuple[str, str]]]

    def key(self, index: int, rest: str) -> str:
        return f"{self.prefix}.{index}.{rest}"


def find_stack(metas: Mapping[str, sb.TensorMeta], prefix: str | None) -> Stack:
    """The block stack named by ``prefix``, or the only one there is; blocks must be numbered 0..L-1 without gaps."""
    found: dict[str, dict[int, list[tuple[str, str]]]] = {}
    for key in metas:
        match = LAYER_KEY.match(key)
        if match:
            found.setdefault(match["prefix"], {}).setdefault(int(match["index"]), []).append((key, match["rest"]))
    if prefix is None:
        if not found:
            raise sb.PlanError("no numbered blocks (such as 'model.layers.0.…') in the checkpoint; name them with 'prefix'")
        if len(found) > 1:
            listed = ", ".join(f"{p!r} ({len(b)} blocks)" for p, b in found.items())
            raise sb.PlanError(f"several stacks of numbered blocks: {listed}; name the one to grow with 'prefix'")
        prefix = next(iter(found))
    if prefix not in found:
        raise sb.PlanError(f"no tensors named {prefix!r}.N.… in the checkpoint"
                           + (f" (it has {', '.join(repr(p) for p in found)})" if found else ""))
    blocks = found[prefix]
    count = max(blocks) + 1
    missing = [i for i in range(count) if i not in blocks]
    if missing:
        raise sb.PlanError(f"blocks {sb_range(missing)} of {prefix!r} are missing: the blocks must be numbered 0..{count - 1}")
    return Stack(prefix, count, blocks)


def sb_range(values: Sequence[int]) -> str:
    from statebridge.tensors.patterns import number_range

    return number_range(list(values))


def depth_key(config: Mapping[str, Any]) -> str | None:
    """The key under which ``config`` counts its blocks, if any."""
    return next((k for k in DEPTH_KEYS if isinstance(config.get(k), int)), None)


def per_layer_edits(config: Mapping[str, Any], count: int, sources: Sequence[int]) -> dict[str, Any]:
    """Edits making ``config`` describe the blocks ``sources`` (new block i is old block ``sources[i]``).

    The block count becomes ``len(sources)`` and every list with one entry per old block
    (``layer_types``, per-layer window sizes, ...) is re-indexed the same way.  When the top
    level does not count these blocks, the nested config that does (``text_config`` of a
    multimodal model) is edited instead; two nested configs that both count ``count`` blocks
    (a vision tower of the same depth) are an error, since either could be the grown stack.
    Lists of block *indices* (such as ``mlp_only_layers``) cannot be told from per-layer lists
    by their shape alone and are left as they are: the README says so.
    """
    own = _own_edits(config, count, sources)
    if own:
        return own
    nested = {name: _own_edits(value, count, sources) for name, value in config.items() if isinstance(value, Mapping)}
    nested = {name: edits for name, edits in nested.items() if edits}
    if len(nested) > 1:
        raise sb.PlanError(f"config.json's {' and '.join(repr(n) for n in nested)} both count {count} blocks: cannot tell "
                           "which one the grown stack is; edit config.json yourself")
    return {name: {**config[name], **edits} for name, edits in nested.items()}


def _own_edits(config: Mapping[str, Any], count: int, sources: Sequence[int]) -> dict[str, Any]:
    key = depth_key(config)
    if key is None or config[key] != count:
        return {}
    edits: dict[str, Any] = {key: len(sources)}
    for name, value in config.items():
        if isinstance(value, list) and len(value) == count:
            edits[name] = [value[i] for i in sources]
    return edits
