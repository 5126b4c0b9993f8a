"""The built-in transforms, registered as a default plugin through the same hook as any plugin's."""

from ..hookspecs import hookimpl


@hookimpl
def register_transforms(register):
    # Imported here, not at the top: listing commands never needs pydantic or the transforms.
    from .adapt import AdaptShapes
    from .combine import Chunk, Concat, Split, Stack, Unstack
    from .composite import Parallel, Pipeline, Scope
    from .quantize import Quantize
    from .layout import Permute, Reshape, Transpose
    from .rename import Drop, Identity, Rename
    from .values import Cast, ValueOp

    for cls in (Rename, Identity, Drop, Concat, Split, Chunk, Stack, Unstack, Transpose, Permute, Reshape, Cast, ValueOp,
                Quantize, AdaptShapes, Pipeline, Parallel, Scope):
        register(cls)
