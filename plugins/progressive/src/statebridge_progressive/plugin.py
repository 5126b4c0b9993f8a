"""The statebridge-progressive plugin: grow a trained model instead of training a bigger one.

Transforms: ``grow_depth`` (LLaMA-Pro block expansion, SOLAR slices, duplication) and
``grow_width`` (function-preserving widening).  Commands: ``statebridge grow depth``,
``statebridge grow width`` and ``statebridge grow importance``.  The ``.tprog`` progressive
checkpoint format, EWC and Block Influence are Python APIs of the package
(:mod:`statebridge_progressive.tprog`, :mod:`~statebridge_progressive.ewc`,
:mod:`~statebridge_progressive.importance`).

statebridge imports this module at start-up (``statebridge --help`` included), so it stays
light: the transforms, pydantic and torch are imported inside the hooks and commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

import statebridge


@statebridge.hookimpl
def register_transforms(register):
    from .depth import GrowDepth
    from .width import GrowWidth

    register(GrowDepth)
    register(GrowWidth)


@click.group()
def grow() -> None:
    """Grow a model: more blocks, wider blocks, and which blocks matter."""


def _run(source: str, step: statebridge.Transform, out: str, overwrite: bool, as_json: bool) -> None:
    """Plan ``step`` on ``source`` (bad input: exit 2), run it into ``out`` (a failure mid-run: exit 1), print the report."""
    built = statebridge.plan(source, [step])
    try:
        report = statebridge.run(built, None, out, overwrite=overwrite, progress=False)
    except statebridge.SourceError as e:
        raise statebridge.ExecutionError(str(e)) from None
    if as_json:
        click.echo(json.dumps({"target": str(report.target), "files": [str(f) for f in report.files]}, indent=2))
    else:
        click.echo(report.render())


def _ranges(text: str) -> list[tuple[int, int]]:
    """``0:24,8:32`` -> [(0, 24), (8, 32)]."""
    try:
        return [(int(a), int(b)) for a, b in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise statebridge.ConfigError(f"--slices {text!r}: give START:END ranges separated by commas, e.g. 0:24,8:32") from None


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise statebridge.ConfigError(f"{option} {text!r}: give block numbers separated by commas, e.g. 3,4,5") from None


@grow.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--method", type=click.Choice(["llama_pro", "slices", "duplicate"]), required=True)
@click.option("--num-layers", type=click.IntRange(min=1), help="llama_pro: the number of blocks after growing")
@click.option("--slices", "slices", help="slices: START:END block ranges laid end to end, e.g. 0:24,8:32")
@click.option("--indices", help="duplicate: blocks each followed by a copy, e.g. 3,4,5")
@click.option("--noise-std", type=click.FloatRange(min=0.0), default=0.0, help="duplicate: Gaussian noise on the copies")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of that noise")
@click.option("--zero", "zero", multiple=True, help="llama_pro: a module zeroed in the copies (repeatable; default o_proj, down_proj)")
@click.option("--prefix", help="the blocks' name prefix, e.g. model.layers (found when there is one stack)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the run as JSON")
def depth(source: str, out: str, method: str, num_layers: int | None, slices: str | None, indices: str | None,
          noise_std: float, seed: int, zero: tuple[str, ...], prefix: str | None, overwrite: bool, as_json: bool) -> None:
    """Grow SOURCE by blocks, writing OUT (a model folder gives a model folder with config.json edited).

    llama_pro inserts copies with zeroed output projections: OUT computes exactly what SOURCE
    does. Unchanged tensors are copied as raw bytes.
    """
    from .depth import GrowDepth

    params: dict[str, Any] = {"method": method, "prefix": prefix, "seed": seed, "noise_std": noise_std}
    if num_layers is not None:
        params["num_layers"] = num_layers
    if slices is not None:
        params["slices"] = _ranges(slices)
    if indices is not None:
        params["indices"] = _ints(indices, "--indices")
    if zero:
        params["zero"] = list(zero)
    _run(source, GrowDepth(params), out, overwrite, as_json)


@statebridge.hookimpl
def register_commands(register):
    register(grow)
