"""The example plugin's hooks: one transform, one check and one command.

statebridge imports this module through the entry point in ``pyproject.toml``
and pluggy finds the functions below by their names and ``@hookimpl``.  The
module stays light (no torch, no pydantic at import): what a hook needs is
imported inside it.

Use the transform in a config like any built-in one::

    steps:
      - scale_by_name: {pattern: "model.layers.*.mlp.down_proj.weight", factor: 0.5}
"""

from __future__ import annotations


import click

import statebridge


@statebridge.hookimpl
def register_transforms(register):
    from .transforms import ScaleByName

    register(ScaleByName)


@statebridge.hookimpl
def validate_plan(plan) -> list[statebridge.Finding]:
    """Warn about every ``scale_by_name`` step whose factor is 0 (it zeroes the tensors it matches)."""
    from .transforms import ScaleByName

    return [
        statebridge.Finding(
            "warning",
            f"scale_by_name with factor 0 sets every tensor matching {step.params.pattern!r} to zero",
            check="example_scale.zero_factor",
        )
        for step in plan.pipeline.walk()
        if isinstance(step, ScaleByName) and step.params.factor == 0
    ]


@click.command("scale-factors")
@click.argument("config", type=click.Path(dir_okay=False))
def scale_factors(config: str) -> None:
    """List the scale_by_name steps of CONFIG with their patterns and factors."""
    from .transforms import ScaleByName

    pipeline = statebridge.load_config(config).pipeline()
    for step in pipeline.walk():
        if isinstance(step, ScaleByName):
            click.echo(f"{step.params.pattern}: x{step.params.factor:g}")


@statebridge.hookimpl
def register_commands(register):
    register(scale_factors)
