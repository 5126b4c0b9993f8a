"""Rule fingerprints and lineage: what identifies a conversion, and what made each tensor.

The fingerprint is a sha256 over the canonical form of the pipeline: every
step's transform name, its version, the distribution and version of the plugin
that provides it, and its parameters.  Lists keep their order (step order,
input order matter); mapping keys are sorted (their order does not).  When the source
is a model folder, the edits the steps make to its config.json and other JSON companions are part of it too, and so
are the metadata fields a run sets or deletes (``metadata:``).  Paths of
the source and target are not part of it, so the same config gives the same
fingerprint on any machine.

The provenance keys a run writes are reserved (:mod:`statebridge.tensors.provenance`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..tensors.provenance import FINGERPRINT_KEY, LINEAGE_KEY, VERSION_KEY

if TYPE_CHECKING:
    from ..transforms.base import Transform
    from ..transforms.compose import Lineage



def canonical(transform: Transform, providers: Mapping[str, str]) -> dict[str, Any]:
    """The step as data: name, versions and parameters, nested steps included.

    ``providers`` maps transform names to the plugin (``"dist version"``) that
    registered them; a transform built in the caller's own code is named by its module.
    """
    steps = getattr(transform, "steps", None)
    params = transform.params.model_dump(mode="json", exclude={"steps"} if steps is not None else None)
    if steps is not None:
        params["steps"] = [canonical(step, providers) for step in steps]
    return {
        "transform": transform.name,
        "version": type(transform).version,
        "plugin": providers.get(transform.name, type(transform).__module__),
        "params": params,
    }


def fingerprint(
    pipeline: Transform,
    providers: Mapping[str, str],
    config_edits: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    companion_edits: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """sha256 (hex) of the pipeline's canonical form, with the core's version, the config.json edits it makes,
    its edits to other JSON companions (file -> key -> value) and the metadata fields the run sets or deletes."""
    document: dict[str, Any] = {"statebridge": __version__, "pipeline": canonical(pipeline, providers)}
    if config_edits:  # absent when there are none, so a plain checkpoint's fingerprint is as before
        document["config_edits"] = dict(config_edits)
    if companion_edits:  # likewise
        document["companion_edits"] = {name: dict(edits) for name, edits in companion_edits.items()}
    if metadata:  # likewise: a run without metadata edits keeps its fingerprint
        document["metadata"] = dict(metadata)
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a parameter holding a lone surrogate still hashes (the step refuses it with its own message)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def lineage_json(lineage: Mapping[str, Lineage]) -> str:
    """Per-tensor lineage for the output's metadata: only tensors some step renamed or changed."""
    recorded = {key: {"from": list(lin.sources), "ops": list(lin.ops)} for key, lin in lineage.items() if lin.ops}
    return json.dumps(recorded, separators=(",", ":"), ensure_ascii=False)


def provenance(fingerprint: str, lineage: Mapping[str, Lineage]) -> dict[str, str]:
    """The metadata every run stores in its output (where the format has room for it)."""
    return {VERSION_KEY: __version__, FINGERPRINT_KEY: fingerprint, LINEAGE_KEY: lineage_json(lineage)}
