"""The statebridge-seeddelta plugin: SeedΔ, a dense FFN weight replaced by a seeded base plus a sparse residual.

Registers the ``seeddelta`` transform (adds fitted SeedΔ tensors, strips the dense weights they
replace), the ``seeddelta.quality`` gate, and the commands ``statebridge seeddelta build``,
``report``, ``capture`` and ``eval``. The math, the policy, the runtime and matplotlib are imported
inside the hooks and commands: statebridge imports this module at start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

import statebridge


@statebridge.hookimpl
def register_transforms(register):
    from .emit import SeedDeltaEmit

    register(SeedDeltaEmit)


@statebridge.hookimpl
def register_gates(register):
    from .gating import NAME, quality

    register(NAME, quality)


@click.group()
def seeddelta() -> None:
    """SeedΔ: FFN weights as a seeded base plus a sparse residual, gated on real activations."""


def _layers(text: str | None) -> set[int] | None:
    if text is None:
        return None
    from .policy import parse_layers

    try:
        return parse_layers(text)
    except ValueError as e:
        raise statebridge.ConfigError(f"--layers: {e}") from None


def _gates(values: tuple[str, ...]) -> dict:
    found = {}
    for value in values:
        name, sep, setting = value.partition("=")
        try:
            found[name] = json.loads(setting) if sep else True
        except json.JSONDecodeError as e:
            raise statebridge.ConfigError(f"--gate {value}: the setting is not JSON ({e.msg})") from None
    return found


@seeddelta.command()
@click.argument("model", type=click.Path())
@click.argument("out", type=click.Path(), required=False)
@click.option("--policy", "policy_path", type=click.Path(), help="policy JSON (defaults, ranges, layers, tensors)")
@click.option("--activations", type=click.Path(), help="safetensors of each weight's inputs [n, in] (seeddelta capture)")
@click.option("--imatrix", type=click.Path(), help="llama.cpp imatrix (GGUF or legacy .dat) when no activations")
@click.option("--eval-x", "eval_x", type=click.Path(), help="held-out inputs, same layout as --activations")
@click.option("--layers", help="only these layers, e.g. 15-20 or 2,9")
@click.option("--tensors", "kinds", help="only these types: ffn_gate,ffn_up,ffn_down")
@click.option("--gate", "gates", multiple=True, help="another registered gate that must accept, NAME or NAME=JSON")
@click.option("--sidecar", is_flag=True, help="write only the SeedΔ tensors to OUT (general.type = seeddelta)")
@click.option("--report-json", type=click.Path(), help="write the build report here")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="worker processes fitting tensors (per rank under torchrun)")
@click.option("--distributed/--no-distributed", default=None,
              help="share the tensors over torchrun's ranks (default: when started by torchrun)")
@click.option("--dry-run", is_flag=True, help="show what would be fitted; fit and write nothing")
@click.option("--overwrite", is_flag=True, help="replace OUT if it exists")
def build(model: str, out: str | None, policy_path: str | None, activations: str | None, imatrix: str | None,
          eval_x: str | None, layers: str | None, kinds: str | None, gates: tuple[str, ...], sidecar: bool,
          report_json: str | None, jobs: int, distributed: bool | None, dry_run: bool, overwrite: bool) -> None:
    """Fit SeedΔ for MODEL's FFN weights by the policy, gate them, and write OUT (a GGUF).

    Under torchrun the ranks share the tensors; rank 0 alone prints, writes OUT and the report, and
    sets the job's exit status.
    """
    from .build import Inputs
    from .build import build as run_build
    from .names import TENSOR_TYPES

    # As `statebridge run` does, under torchrun only rank 0 speaks. Every rank meets the same errors in the
    # arguments, and a failure inside the build reaches every rank (each raises the same error); so the
    # others end quietly with status 0: a rank ending in failure would have torchrun stop rank 0 (SIGTERM)
    # before it printed the error.
    speaks = distributed is False or int(os.environ.get("RANK", "0")) == 0
    try:
        if out is None and not dry_run:
            raise statebridge.ConfigError("give OUT (or --dry-run)")
        kind_set = None
        if kinds:
            kind_set = {k.strip() for k in kinds.split(",")}
            if not kind_set <= set(TENSOR_TYPES):
                raise statebridge.ConfigError(f"--tensors: {sorted(kind_set - set(TENSOR_TYPES))} not among {TENSOR_TYPES}")
        report = run_build(model, None if dry_run else out, policy=policy_path,
                           inputs=Inputs(activations, imatrix, eval_x, _gates(gates)), layers=_layers(layers),
                           kinds=kind_set, sidecar=sidecar, overwrite=overwrite, jobs=jobs, distributed=distributed,
                           dry_run=dry_run, progress=(lambda line: click.echo(line, err=True)) if speaks else None)
    except statebridge.StatebridgeError:
        if speaks:
            raise
        raise click.exceptions.Exit(0) from None
    if not speaks:
        return
    if report_json:
        from . import reports

        reports.write(report_json, report, "--report-json")
    click.echo(render(report))


def render(report: dict) -> str:
    """The report as a table: one line per weight."""
    lines = [f"seeddelta build: policy {report['build']['policy_file']} ({report['build']['policy_hash'][:12]})"]
    lines.append(f"  {'weight':<28} {'K':>5} {'base':<13} {'cos_x':>7} {'p05':>7} {'nr':>6} {'topK':>7}  decision")
    for layer in report["layers"].values():
        for entry in layer["tensors"].values():
            m, t = entry.get("metrics", {}), entry.get("topk_same_bytes", {}).get("metrics", {})
            fitted = entry.get("fit", {})
            k = fitted.get("K", entry.get("would_fit", {}).get("K", ""))
            dec = entry.get("decision", {})
            verdict = ("emit" + (" +strip" if dec.get("strip_applied") else "")) if dec.get("emit_delta") else \
                (dec.get("reason", "would fit") if dec else "would fit")
            lines.append(f"  {entry['weight']:<28} {str(k):>5} {fitted.get('base', ''):<13} "
                         f"{m.get('cos_mean_x_w', float('nan')):>7.4f} {m.get('cos_p05_x_w', float('nan')):>7.4f} "
                         f"{m.get('norm_ratio_x_w', float('nan')):>6.3f} {t.get('cos_mean_x_w', float('nan')):>7.4f}  {verdict}")
    s = report.get("summary", {})
    if not s.get("dry_run"):
        lines.append(f"  {s.get('emitted', 0)} of {s.get('fitted', 0)} fitted weights emitted, {s.get('stripped', 0)} "
                     f"stripped, unsafe: {', '.join(s.get('unsafe', [])) or 'none'}")
    return "\n".join(lines)


@seeddelta.command()
@click.argument("report_json", type=click.Path())
@click.option("--png", type=click.Path(), required=True, help="where to write the plot")
def report(report_json: str, png: str) -> None:
    """Plot REPORT_JSON's metrics per layer and tensor type, with pass/fail (needs matplotlib)."""
    from .plot import plot

    plot(report_json, png)
    click.echo(f"wrote {png}")


@seeddelta.command()
@click.argument("model", type=click.Path())
@click.option("--text", "text_file", type=click.Path(), required=True, help="a UTF-8 text file to run through the model")
@click.option("--out", type=click.Path(), required=True, help="the safetensors file to write")
@click.option("--layers", help="only these layers, e.g. 15-20")
@click.option("--max-tokens", type=click.IntRange(min=2), default=4096, show_default=True)
def capture(model: str, text_file: str, out: str, layers: str | None, max_tokens: int) -> None:
    """Record the inputs of MODEL's FFN weights on TEXT (transformers; a GGUF model too)."""
    from safetensors.torch import save_file

    from .capture import capture as run_capture

    found = run_capture(model, _text(text_file), layers=_layers(layers), max_tokens=max_tokens)
    save_file(found, out)
    n = next(iter(found.values())).shape[0]
    click.echo(f"wrote {out}: {len(found)} weights, {n} tokens each")


@seeddelta.command(name="eval")
@click.argument("model", type=click.Path())
@click.argument("seeded", type=click.Path())
@click.option("--text", "text_file", type=click.Path(), required=True, help="held-out UTF-8 text to run through the model")
@click.option("--max-tokens", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--chunk", type=click.IntRange(min=2), default=512, show_default=True, help="tokens per context")
@click.option("--report", "report_json", type=click.Path(), help="add the figures to this build report (end_to_end)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def evaluate(model: str, seeded: str, text_file: str, max_tokens: int, chunk: int, report_json: str | None,
             as_json: bool) -> None:
    """MODEL with SEEDED's SeedΔ layers swapped in, against MODEL: mean KLD, same top-1, bytes (transformers)."""
    from . import reports
    from .evaluate import end_to_end, render as render_eval

    text = _text(text_file)
    report = reports.read(report_json, "--report") if report_json else None
    result = end_to_end(model, seeded, text, max_tokens=max_tokens, chunk=chunk)
    if report_json and report is not None:
        reports.write(report_json, {**report, "end_to_end": result}, "--report")
    click.echo(json.dumps(result, indent=2) if as_json else render_eval(result))


def _text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise statebridge.ConfigError(f"{path}: cannot read the text: {e}") from None


@statebridge.hookimpl
def register_commands(register):
    register(seeddelta)
