"""statebridge: declarative, checked, streaming transformations of PyTorch model state.

Open a checkpoint lazily, describe the conversion as transforms, look at the
plan (built from headers alone), then stream it into a file or a module::

    import statebridge as sb

    steps = [sb.Rename(pattern="model.**", to="**")]
    print(sb.plan("ckpt/", steps).render())
    sb.run("ckpt/", steps, "out/")
    sb.load_into(model, "out/")
"""

__version__ = "0.1.0"

from .analyze import Report, analyze
from .api import RunReport, load_into, plan, run
from .checks import Finding
from .config import RunConfig, load_config, parse_config
from .estimate import Estimate, estimate
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
from .gates import Candidates, GateDecision
from .hookspecs import hookimpl
from .io import DictSource, ModuleSource, Source, open_source
from .meta import DType, TensorMeta
from .plan import Plan
from .registry import register_transform
from .transaction import Transaction, transaction
from .versions import VersionGraph
from .transforms import (
    AdaptShapes,
    Cast,
    Chunk,
    Concat,
    Drop,
    Group,
    Identity,
    Parallel,
    Params,
    Permute,
    Pipeline,
    Rename,
    Reshape,
    Scope,
    Sequential,
    Split,
    Stack,
    Transform,
    Transpose,
    Unstack,
    ValueOp,
    identity_from_module,
)

__all__ = [
    "AdaptShapes", "Candidates", "Cast", "Chunk", "CollisionError", "Concat", "ConfigError", "DictSource", "Drop", "DType",
    "ExecutionError", "Finding", "GateDecision", "GateRejectedError", "Group", "Identity", "ModuleSource",
    "NotInvertibleError", "Parallel", "Params", "Permute", "Pipeline", "Plan", "PlanError", "PluginError", "Rename",
    "Report", "Reshape", "RunConfig", "RunReport", "Scope", "Sequential", "Source", "SourceError", "Split", "Stack",
    "StatebridgeError", "TensorMeta", "Transform", "Transpose", "UnknownTransformError", "Unstack", "ValueOp",
    "analyze", "hookimpl", "identity_from_module", "load_config", "load_into", "open_source", "parse_config", "plan",
    "register_transform", "run", "Estimate", "estimate", "Transaction", "transaction", "VersionGraph",
]
