"""The built-in transforms. Importing this package registers them."""

from .adapt import AdaptShapes
from .base import Group, Params, Transform
from .combine import Chunk, Concat, Split, Stack, Unstack
from .composite import Parallel, Pipeline, Scope, Sequential, build_steps
from .layout import Permute, Reshape, Transpose
from .rename import Drop, Identity, Rename, identity_from_module
from .values import VALUE_OPS, Cast, ValueOp

__all__ = [
    "AdaptShapes",
    "Cast",
    "Chunk",
    "Concat",
    "Drop",
    "Group",
    "Identity",
    "Parallel",
    "Params",
    "Permute",
    "Pipeline",
    "Rename",
    "Reshape",
    "Scope",
    "Sequential",
    "Split",
    "Stack",
    "Transform",
    "Transpose",
    "Unstack",
    "VALUE_OPS",
    "ValueOp",
    "build_steps",
    "identity_from_module",
]
