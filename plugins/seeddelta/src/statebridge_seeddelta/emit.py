"""The ``seeddelta`` transform: add fitted SeedΔ tensors from a file, and drop the dense weights they replace.

Fitting is data-dependent while statebridge plans from headers; so the builder fits first,
writes the SeedΔ tensors to a safetensors file, and then plans this step, whose outputs'
shapes the file's header gives: ``{seeddelta: {tensors: fitted.safetensors, strip: [...]}}``.
Each SeedΔ tensor is a new key computed by reading it from the file; each ``strip`` key is
read and not written (it is listed as dropped, like a ``drop`` step's keys). A strip key
without its SeedΔ tensors in the file is an error: dense weights go only where a
replacement is.
"""

from __future__ import annotations

from collections.abc import Mapping

import statebridge as sb

from . import names


class SeedDeltaEmit(sb.Transform):
    """Add the SeedΔ tensors of ``tensors`` to the state; drop the dense weights in ``strip``."""

    name = "seeddelta"

    class Params(sb.Params):
        tensors: sb.PathParam
        strip: list[str] = []

    def plan(self, metas: Mapping[str, sb.TensorMeta]) -> list[sb.Group]:
        path = str(self.params.tensors)
        source = sb.open_source(path)
        fitted = dict(source.metas())
        groups = []
        for key, meta in fitted.items():
            if key in metas:
                raise sb.PlanError(f"{key!r} from {path} is already in the model")
            groups.append(sb.Group(inputs=(), outputs={key: meta}, compute=_reader(path, key), ops=("seeddelta",)))
        for key in self.params.strip:
            if key not in metas:
                raise sb.PlanError(f"strip: {key!r} is not in the model")
            if names.sd_name(key, "val") not in fitted:
                raise sb.PlanError(f"strip: {key!r} has no SeedΔ tensors in {path}; a dense weight is stripped only "
                                   "where its replacement is")
            groups.append(sb.Group(inputs=(key,), outputs={}, compute=lambda t: {}, ops=("seeddelta(strip dense)",)))
        return groups


def _reader(path: str, key: str):  # noqa: ANN202 - a compute function
    def compute(_: dict) -> dict:
        with sb.open_source(path) as source:
            return {key: source.load(key).clone()}

    return compute
