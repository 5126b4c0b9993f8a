"""statebridge: declarative, checked, streaming transformations of PyTorch model state.

Open a checkpoint lazily, describe the conversion as transforms, look at the
plan (built from headers alone), then stream it into a file or a module::

    import statebridge as sb

    steps = [sb.Rename(pattern="model.**", to="**")]
    print(sb.plan("ckpt/", steps).render())
    sb.run("ckpt/", steps, "out/")
    sb.load_into(model, "out/")

Everything a user or plugin author needs is importable from here.  Names are
loaded on first use, so ``import statebridge`` (which every plugin does at
start-up) costs almost nothing and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .hookspecs import hookimpl

#: public name -> the module that defines it
_PUBLIC = {
    # running
    "plan": "api", "run": "api", "as_pipeline": "api", "load_into": "api", "analyze": "analysis", "RunReport": "api",
    "RunConfig": "config", "load_config": "config", "parse_config": "config",
    "RunOptions": "options", "PlanOptions": "options",
    "open_source": "readers", "DictSource": "readers", "ModuleSource": "readers", "Source": "readers.base",
    "RawSpan": "readers.base",
    "Plan": "planning.plan", "Estimate": "execute.estimate", "estimate": "execute.estimate",
    "Transaction": "execute.transaction", "transaction": "execute.transaction",
    # transforms and their parts
    "Transform": "transforms.base", "Companions": "transforms.base", "Params": "transforms.base", "Group": "transforms.base", "Piece": "transforms.base",
    "Candidates": "transforms.base", "PathParam": "transforms.base",
    "select": "transforms.matching", "bind": "transforms.matching", "require": "transforms.matching",
    "Rename": "transforms.rename", "Identity": "transforms.rename", "Drop": "transforms.rename",
    "identity_from_module": "transforms.rename",
    "Concat": "transforms.combine", "Split": "transforms.combine", "Chunk": "transforms.combine",
    "Stack": "transforms.combine", "Unstack": "transforms.combine",
    "Transpose": "transforms.layout", "Permute": "transforms.layout", "Reshape": "transforms.layout",
    "Cast": "transforms.values", "ValueOp": "transforms.values", "AdaptShapes": "transforms.adapt",
    "Quantize": "transforms.quantize",
    "Pipeline": "transforms.composite", "Sequential": "transforms.composite", "Parallel": "transforms.composite",
    "Scope": "transforms.composite",
    "TensorMeta": "tensors.meta", "DType": "tensors.meta", "KeyPattern": "tensors.patterns",
    # writers, checks, gates, reports
    "Writer": "writers.base", "PlannedFile": "writers.base",
    "Finding": "trust.findings", "GateDecision": "trust.gates", "Report": "trust.summary",
    "Requirements": "trust.coverage", "VersionGraph": "trust.versions",
    # errors
    "StatebridgeError": "errors", "SourceError": "errors", "ConfigError": "errors", "UnknownTransformError": "errors",
    "PlanError": "errors", "CollisionError": "errors", "NotInvertibleError": "errors", "ExecutionError": "errors",
    "GateRejectedError": "errors", "PluginError": "errors",
}

__all__ = sorted([*_PUBLIC, "__version__", "hookimpl"])


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'statebridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .analysis import analyze
    from .api import RunReport, as_pipeline, load_into, plan, run
    from .config import RunConfig, load_config, parse_config
    from .errors import (
        CollisionError,
        ConfigError,
        ExecutionError,
        GateRejectedError,
        NotInvertibleError,
        PlanError,
        PluginError,
        SourceError,
        StatebridgeError,
        UnknownTransformError,
    )
    from .execute.estimate import Estimate, estimate
    from .execute.transaction import Transaction, transaction
    from .options import PlanOptions, RunOptions
    from .planning.plan import Plan
    from .readers import DictSource, ModuleSource, open_source
    from .readers.base import RawSpan, Source
    from .tensors.meta import DType, TensorMeta
    from .tensors.patterns import KeyPattern
    from .transforms.adapt import AdaptShapes
    from .transforms.base import Candidates, Companions, Group, Params, PathParam, Piece, Transform
    from .transforms.combine import Chunk, Concat, Split, Stack, Unstack
    from .transforms.composite import Parallel, Pipeline, Scope, Sequential
    from .transforms.layout import Permute, Reshape, Transpose
    from .transforms.matching import bind, require, select
    from .transforms.quantize import Quantize
    from .transforms.rename import Drop, Identity, Rename, identity_from_module
    from .transforms.values import Cast, ValueOp
    from .trust.coverage import Requirements
    from .trust.findings import Finding
    from .trust.gates import GateDecision
    from .trust.summary import Report
    from .trust.versions import VersionGraph
    from .writers.base import PlannedFile, Writer
