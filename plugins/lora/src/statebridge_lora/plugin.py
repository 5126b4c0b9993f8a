"""The statebridge-lora plugin: LoRA adapters at checkpoint level.

Transforms: ``lora_merge`` (fold PEFT LoRA adapters into a base checkpoint, bit for bit as
``merge_and_unload``), ``lora_extract`` (a PEFT adapter from the difference of two
checkpoints) and ``lora_layout`` (between ``X.weight`` and ``X.main_weight`` + ``X.lora_A/B``).  Commands: ``statebridge lora merge BASE ADAPTER OUT`` and
``statebridge lora extract BASE TUNED OUT --rank R``.

statebridge imports this module at start-up (``statebridge --help`` included), so it stays
light: the transforms, pydantic and torch are imported inside the hooks and commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

import statebridge


@statebridge.hookimpl
def register_transforms(register):
    from .extract import LoraExtract
    from .layout import LoraLayout
    from .transforms import LoraMerge

    register(LoraMerge)
    register(LoraExtract)
    register(LoraLayout)


#: initialisations that change the base weights themselves: the adapter belongs to a residual base
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


@statebridge.hookimpl
def validate_plan(plan) -> list[statebridge.Finding]:
    """Warn when an adapter was initialised by PiSSA, OLoRA, CorDA or LoftQ without conversion.

    Those initialisations subtract the adapter's start from the base weights, so the adapter
    merges correctly only into that residual base (PEFT's answer is wrong on the original
    base too), unless it was saved with ``path_initial_model_for_weight_conversion``, which
    makes it a plain LoRA adapter and records ``init_lora_weights: true``.
    """
    from .adapter import read_config
    from .transforms import LoraMerge

    findings = []
    for step in plan.pipeline.walk():
        if not isinstance(step, LoraMerge):
            continue
        for ref in step.refs():
            init = read_config(Path(ref.path)).get("init_lora_weights")
            if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
                findings.append(statebridge.Finding(
                    "warning", f"adapter {ref.path} was initialised with {init!r}: it merges correctly only into the "
                    "residual base it was trained on (or convert it with PEFT's path_initial_model_for_weight_conversion)",
                    check="lora.residual_init"))
    return findings


@click.group()
def lora() -> None:
    """LoRA adapters: merge them into a checkpoint, extract them from two."""


def _run(base: str, step: statebridge.Transform, out: str, overwrite: bool) -> statebridge.RunReport:
    """Plan ``step`` on ``base`` (bad input: exit 2), then run it into ``out`` (a source failing mid-run: exit 1)."""
    built = statebridge.plan(base, [step])
    try:
        return statebridge.run(built, None, out, overwrite=overwrite, progress=False)
    except statebridge.SourceError as e:
        raise statebridge.ExecutionError(str(e)) from None


@lora.command()
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--add", "more", multiple=True, type=click.Path(), help="another adapter to combine with ADAPTER (repeatable)")
@click.option("--weight", "weights", multiple=True, type=float,
              help="weights of ADAPTER and each --add, in order (default 1 each)")
@click.option("--combination", type=click.Choice(["cat", "linear", "sequential"]), default="cat", show_default=True,
              help="how several adapters combine: PEFT's add_weighted_adapter cat or linear, or merged in turn")
@click.option("--safe-merge", is_flag=True, help="PEFT's safe_merge arithmetic; non-finite merged weights are an error")
@click.option("--no-report", is_flag=True, help="skip the merge report (the per-tensor measures the merge takes on the way)")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the run and the merge report as JSON")
def merge(base: str, adapter: str, out: str, more: tuple[str, ...], weights: tuple[float, ...], combination: str,
          safe_merge: bool, no_report: bool, overwrite: bool, as_json: bool) -> None:
    """Merge the PEFT LoRA ADAPTER folder into BASE, writing OUT.

    BASE is any checkpoint statebridge reads; a model folder gives a model folder
    (config.json, tokenizer and the rest carried). Only the adapted tensors are
    computed; the others are copied as raw bytes. Prints the merge report:
    per tensor |dW|/|W| and the rounding error of the cast back to the base dtype.
    """
    from .transforms import LoraMerge

    paths = [adapter, *more]
    if len(weights) > len(paths):
        raise statebridge.ConfigError(f"{len(weights)} --weight values for {len(paths)} adapters")
    full = [*weights, *[1.0] * (len(paths) - len(weights))]
    if len(paths) == 1 and full[0] == 1.0:
        step = LoraMerge(adapter=adapter, safe_merge=safe_merge, report=not no_report)
    else:
        step = LoraMerge(adapters=[{"path": p, "weight": w} for p, w in zip(paths, full)],
                         combination=combination, safe_merge=safe_merge, report=not no_report)
    report = _run(base, step, out, overwrite)
    merged = None if no_report else step.report()
    if as_json:
        click.echo(json.dumps({"target": str(report.target), "files": [str(f) for f in report.files],
                               "merge": merged.to_dict() if merged else None}, indent=2))
    else:
        click.echo(report.render())
        if merged:
            click.echo(merged.render())


@lora.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--rank", type=click.IntRange(min=1), required=True, help="the largest rank of a module")
@click.option("--threshold", type=float, default=0.0, show_default=True,
              help="drop singular values at or below this fraction of the largest")
@click.option("--energy", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="per module, the smallest rank keeping this fraction of the squared singular values")
@click.option("--fan-in-fan-out", is_flag=True, help="the weights are stored (in, out), as GPT-2's Conv1D")
@click.option("--overwrite", is_flag=True, help="replace the adapter in OUT")
@click.option("--json", "as_json", is_flag=True, help="print the extraction report as JSON")
def extract(base: str, tuned: str, out: str, rank: int, threshold: float, energy: float | None, fan_in_fan_out: bool,
            overwrite: bool, as_json: bool) -> None:
    """Extract a PEFT LoRA adapter folder OUT from the difference TUNED - BASE.

    Each changed 2-D weight becomes lora_A/lora_B by SVD in float32 (randomized for
    large matrices); unchanged modules are left out; changed embeddings, norms and
    other tensors go to modules_to_save. PeftModel.from_pretrained loads OUT.
    """
    from .extract import extract_adapter

    summary = extract_adapter(base, tuned, out, rank=rank, threshold=threshold, energy=energy,
                              fan_in_fan_out=fan_in_fan_out, overwrite=overwrite)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.render())


@statebridge.hookimpl
def register_commands(register):
    register(lora)
