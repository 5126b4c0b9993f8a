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


@statebridge.hookimpl
def register_writers(register):
    from .tprog import TprogWriter

    register(TprogWriter)


@click.group()
def grow() -> None:
    """Grow a model: more blocks, wider blocks, and which blocks matter."""


def _run(source: str, step: statebridge.Transform, out: str, overwrite: bool, as_json: bool, durable: bool = True,
         dry_run: bool = False) -> None:
    """Plan ``step`` on ``source`` (bad input: exit 2), run it into ``out`` (a failure mid-run: exit 1), print the report.

    A ``.tprog`` source or target goes through the progressive format (``weights.safetensors``,
    ``tokenizer/`` carried); the step itself records the growth in ``expansion_history``.  ``dry_run`` prints the plan (groups, raw copies, the JSON edits) and writes nothing.
    """
    from . import tprog

    if dry_run:
        built = statebridge.plan(source, [step])
        click.echo(json.dumps(built.to_dict(), indent=2) if as_json else built.render())
        click.echo("dry run: nothing was written")
        return
    if tprog.is_tprog(source) or str(out).endswith(tprog.SUFFIX):
        report = tprog.grow(source, [step], out, overwrite=overwrite, durable=durable)
    else:
        built = statebridge.plan(source, [step])
        try:
            report = statebridge.run(built, None, out, overwrite=overwrite, progress=False, durable=durable)
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
@click.option("--no-fsync", is_flag=True, help="commit without fsync: still atomic, but like cp not safe against a power cut")
@click.option("--dry-run", is_flag=True, help="print the plan (and its config.json and progressive.json edits); write nothing")
@click.option("--json", "as_json", is_flag=True, help="print the run as JSON")
def depth(source: str, out: str, method: str, num_layers: int | None, slices: str | None, indices: str | None,
          noise_std: float, seed: int, zero: tuple[str, ...], prefix: str | None, overwrite: bool, no_fsync: bool,
          dry_run: bool, as_json: bool) -> None:
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
    _run(source, GrowDepth(params), out, overwrite, as_json, durable=not no_fsync, dry_run=dry_run)


def _head_dim(source: str) -> int:
    """The head size config.json of the SOURCE folder gives (head_dim, or hidden_size / num_attention_heads)."""
    if not Path(source).exists():
        raise statebridge.ConfigError(f"{source}: no such file or folder")
    path = Path(source) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        raise statebridge.ConfigError(f"{path}: no head size to read (head_dim, or hidden_size and "
                                      "num_attention_heads); give --head-dim") from None


@grow.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--factor", type=click.IntRange(min=1), help="every width times this (HyperCloning)")
@click.option("--hidden-size", type=click.IntRange(min=1), help="explicit sizes, any larger ones (the others stay)")
@click.option("--intermediate-size", type=click.IntRange(min=1))
@click.option("--num-attention-heads", type=click.IntRange(min=1))
@click.option("--num-key-value-heads", type=click.IntRange(min=1))
@click.option("--residual", type=click.Choice(["auto", "clone", "zero"]), default="auto", show_default=True,
              help="how the residual stream grows: cloned channels (integer factor) or zero channels")
@click.option("--noise-std", type=click.FloatRange(min=0.0), default=0.0, help="symmetry-breaking noise that keeps the function")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--head-dim", type=click.IntRange(min=1), help="the current head size (default: from SOURCE/config.json)")
@click.option("--new-head-dim", type=click.IntRange(min=1), help="a new head size: needs --not-function-preserving")
@click.option("--not-function-preserving", is_flag=True, help="allow a change that does not keep the function")
@click.option("--prefix", help="the blocks' name prefix, e.g. model.layers")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--no-fsync", is_flag=True, help="commit without fsync: still atomic, but like cp not safe against a power cut")
@click.option("--dry-run", is_flag=True, help="print the plan (and its config.json and progressive.json edits); write nothing")
@click.option("--json", "as_json", is_flag=True, help="print the run as JSON")
def width(source: str, out: str, factor: int | None, hidden_size: int | None, intermediate_size: int | None,
          num_attention_heads: int | None, num_key_value_heads: int | None, residual: str, noise_std: float, seed: int,
          head_dim: int | None, new_head_dim: int | None, not_function_preserving: bool, prefix: str | None,
          overwrite: bool, no_fsync: bool, dry_run: bool, as_json: bool) -> None:
    """Widen SOURCE, writing OUT: the same function (max |logit change| ~1e-6 in float32), config.json edited."""
    from .width import GrowWidth

    params = {"factor": factor, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
              "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
              "residual": residual, "noise_std": noise_std, "seed": seed, "new_head_dim": new_head_dim,
              "function_preserving": not not_function_preserving, "prefix": prefix,
              "head_dim": head_dim or _head_dim(source)}
    _run(source, GrowWidth(params), out, overwrite, as_json, durable=not no_fsync, dry_run=dry_run)


@grow.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="calibration text (UTF-8)")
@click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True)
@click.option("--duplicate", type=click.IntRange(min=1), help="how many blocks to recommend duplicating (default: a quarter)")
@click.option("--json", "as_json", is_flag=True, help="print the analysis as JSON")
def importance(model: str, text_file: str, max_tokens: int, duplicate: int | None, as_json: bool) -> None:
    """Block Influence of each block of MODEL over calibration text (ShortGPT: 1 - cos(input, output)).

    MODEL is a transformers model folder or a .tprog; a .tprog gets the scores in its
    progressive.json (layer_analysis) and the blocks to duplicate (recommended_expansion).
    """
    from . import importance as bi
    from . import tprog

    path = Path(model)
    network, tokenizer = _load_model(path)
    try:
        text = Path(text_file).read_text(encoding="utf-8")
        analysis, recommended = bi.analyze(network, tokenizer, text, max_tokens, duplicate=duplicate)
    except (UnicodeDecodeError, ValueError) as e:
        raise statebridge.ConfigError(f"{text_file}: {e}") from None
    if tprog.is_tprog(path):
        meta = tprog.read_meta(path).model_copy(update={"layer_analysis": analysis, "recommended_expansion": recommended})
        (path / tprog.META).write_text(meta.dump(), encoding="utf-8")
    if as_json:
        click.echo(json.dumps({"layer_analysis": analysis.model_dump(mode="json"),
                               "recommended_expansion": recommended.model_dump(mode="json")}, indent=2))
        return
    click.echo(f"Block Influence over {analysis.calibration_tokens} tokens (1 - cos(block input, block output)):")
    for i, score in enumerate(analysis.importance_scores):
        click.echo(f"  block {i:3d}  {score:.6f}")
    click.echo(f"recommended to duplicate: {recommended.layer_duplication_indices}"
               + (f" (recorded in {path / tprog.META})" if tprog.is_tprog(path) else ""))


def _load_model(path: Path) -> tuple[Any, Any]:
    """A transformers causal LM and its tokenizer from a model folder or a .tprog (whose tokenizer is in tokenizer/)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise statebridge.ConfigError("statebridge grow importance runs the model with transformers, which is not "
                                      "installed: pip install 'statebridge-progressive[importance]'") from None

    from . import tprog

    tokenizer_folder = path / "tokenizer" if tprog.is_tprog(path) else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    except (OSError, ValueError) as e:
        raise statebridge.SourceError(tokenizer_folder, f"no tokenizer to read the calibration text ({str(e).splitlines()[0]})") from None
    if tprog.is_tprog(path):
        checkpoint = tprog.read(path)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint.config))
        checkpoint.load_into(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.float().eval(), tokenizer


@statebridge.hookimpl
def validate_plan(plan) -> list[statebridge.Finding]:
    """What a plan should say about growth: a widening that does not keep the function (not only in its ops),
    and a ``.tprog``'s progressive.json whose size no longer fits the result: steps other than
    grow_depth and grow_width changed it, and only those two record themselves."""
    from .width import GrowWidth

    findings = [statebridge.Finding("warning", f"grow_width with function_preserving: false (head size "
                                    f"{step.params.head_dim} -> {step.params.new_head_dim}): the grown model computes "
                                    "a different function and needs training", check="progressive.function_preserving")
                for step in plan.pipeline.walk() if isinstance(step, GrowWidth) and not step.params.function_preserving]
    stale = _stale(plan)
    if stale:
        findings.append(statebridge.Finding(
            "warning", f"{plan.folder.path / 'progressive.json'} is carried with current_size {', '.join(stale)}: "
            "only grow_depth and grow_width record what they change there, and something else changed the size; "
            "grow with those steps, or correct current_size after the run", check="progressive.stale_metadata"))
    return findings


def _stale(plan: Any) -> list[str]:
    """The fields of progressive.json's ``current_size``, as the steps leave it, that the result does not have."""
    from pydantic import ValidationError

    from .tprog import META, Size, size_of

    folder = plan.folder
    try:
        if folder is None or folder.read(META) is None or folder.config is None:
            return []
        recorded = Size.model_validate(folder.edited(META).get("current_size"))
    except (statebridge.SourceError, ValidationError):
        return []  # a malformed file: the growth steps, which read it, report it naming the field
    actual = size_of(folder.edited_config(), plan.outputs)
    return [f"{name} {value} (the result: {getattr(actual, name)})" for name, value in recorded if name != "model_size"
            and value is not None and value != getattr(actual, name)]


@statebridge.hookimpl
def register_commands(register):
    register(grow)
