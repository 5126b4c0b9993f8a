"""Findings about a model folder's companion files: what a step invalidates, what is not carried, where they go.

A companion file describes the tensors beside it: the tokenizer has one entry per
row of the embedding, config.json counts the layers.  When the steps change what
a companion describes and nothing edits it to match, the result would load
wrongly or not at all; the plan says so as a warning, before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..tensors.meta import TensorMeta
from .findings import Finding

if TYPE_CHECKING:
    from ..planning.folder import ModelFolder
    from ..planning.plan import Plan
    from ..writers.base import Writer

CHECK = "core.model_folder"
#: files that describe the vocabulary: one entry per row of the embedding and the output head
TOKENIZER = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|.*\.model|.*\.tiktoken)$")
#: the numbered blocks whose count config.json's num_hidden_layers gives
LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def findings(plan: Plan) -> list[Finding]:
    """What the plan's steps do to the source folder's companions (run by the core's ``validate_plan``)."""
    folder = plan.folder
    if folder is None:
        return []
    found = _left(folder)
    if folder.config is None:
        return found
    metas, edited = plan.source.metas(), folder.edited_config()
    vocabulary = _config_int(folder.config, "vocab_size")
    if vocabulary is not None:
        changed = _vocabulary_changes(vocabulary, metas, plan)
        if changed:
            key, meta = changed[0]
            stale = [c.name for c in folder.companions if TOKENIZER.match(c.name)]
            if _config_int(edited, "vocab_size") == vocabulary:
                stale.insert(0, f"config.json (vocab_size {vocabulary})")
            if stale:
                more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
                found.append(Finding(
                    "warning",
                    f"the steps change the vocabulary of {vocabulary} tokens ({key} becomes {meta}{more}), "
                    f"but {', '.join(stale)} still describe the old one; edit or replace them after the run",
                    CHECK, key,
                ))
    depth = _config_int(folder.config, "num_hidden_layers")
    before, after = _layers(metas), _layers(plan.outputs)
    if depth is not None and before == depth and 0 < after != before and _config_int(edited, "num_hidden_layers") == depth:
        found.append(Finding(
            "warning",
            f"the result has {after} numbered layers, but config.json still says num_hidden_layers {depth}; "
            "no step edits it (a depth-changing transform declares that edit in config_edits)",
            CHECK,
        ))
    return found


def fit_target(plan: Plan, writer: Writer) -> None:
    """Fit ``writer`` to the plan's model folder and say, as an info finding, when its target cannot carry the companions."""
    folder = plan.folder
    if folder is None:
        return
    folder.use(writer)
    # a plan may meet its writer twice, and the writer may carry sub-folders: say anew what is left behind
    plan.findings = [f for f in plan.findings if f.check not in (CHECK + ".target", CHECK + ".left")]
    plan.findings.extend(_left(folder))
    if not folder.carried:
        edits = " and its config.json edits" if folder.edits else ""
        plan.findings.append(Finding(
            "info",
            f"the target {writer.path} is a single file: the model folder's {len(folder.companions)} companion files"
            f"{edits} are not written; give a folder target to carry them",
            CHECK + ".target",
        ))


def _left(folder: ModelFolder) -> list[Finding]:
    """The info finding listing what the target does not get from the folder, each entry with why."""
    if not folder.left:
        return []
    listed = ", ".join(f"{name} ({why})" for name, why in folder.left.items())
    return [Finding("info", f"not carried from the model folder: {listed}", CHECK + ".left")]


def _config_int(config: Mapping[str, Any], key: str) -> int | None:
    """An integer field of config.json, or of its ``text_config`` (multimodal models keep the language model's there)."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), Mapping):
        value = config["text_config"].get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _vocabulary_changes(vocabulary: int, metas: Mapping[str, TensorMeta], plan: Plan) -> list[tuple[str, TensorMeta]]:
    """Outputs made from a tensor with a vocabulary-sized first dimension (embedding, output head) that lost it."""
    sized = {key for key, meta in metas.items() if meta.shape[:1] == (vocabulary,)}
    return [
        (key, plan.outputs[key])
        for key, lineage in plan.lineage.items()
        if lineage.ops and sized.intersection(lineage.sources) and vocabulary not in plan.outputs[key].shape
    ]


def _layers(metas: Mapping[str, TensorMeta]) -> int:
    return len({match[1] for key in metas if (match := LAYER.search(key))})
