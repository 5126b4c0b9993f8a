"""The core's commands (inspect, analyze, plan, run, plugins, schema), registered as a default plugin.

They are ordinary ``click`` commands handed to ``register_commands``, exactly as
a plugin's are.  The options of ``plan`` and ``run`` are built from
:class:`statebridge.options.RunOptions` when one of them runs or shows its help,
so ``statebridge --help`` imports neither pydantic nor torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .hookspecs import hookimpl

JSON = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


class OptionsCommand(click.Command):
    """A command whose options from ``RunOptions`` are added on first use (keeps start-up fast)."""

    def __init__(self, *args: Any, options: Callable[[], list[click.Option]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._options: Callable[[], list[click.Option]] | None = options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._options is not None:
            self.params.extend(self._options())
            self._options = None
        return super().get_params(ctx)


def _option_flags(model_name: str) -> Callable[[], list[click.Option]]:
    """click options for every field of ``statebridge.options.<model_name>`` that names a ``cli`` flag."""

    def build() -> list[click.Option]:
        from typing import Literal, get_args, get_origin

        from . import options

        model = getattr(options, model_name)
        built = []
        for name, field in model.model_fields.items():
            spec = dict((field.json_schema_extra or {}).get("cli") or {})
            if not spec:
                continue
            flag = spec.pop("flag")
            help_text = spec.pop("help", field.description or "")
            if "flag_value" in spec:
                built.append(click.Option([flag, name], is_flag=True, flag_value=spec["flag_value"], default=None, help=help_text))
                continue
            kind: Any = None
            if get_origin(field.annotation) is Literal:
                kind = click.Choice(get_args(field.annotation))
            elif field.annotation is int:
                kind = click.INT
            built.append(click.Option([flag, name], type=kind, default=None, help=help_text, **spec))
        return built

    return build


def _overrides(kwargs: dict[str, Any], override_source: bool) -> dict[str, Any]:
    """The config values the command line sets; its paths are relative to the current directory."""
    from .trust.coverage import Requirements

    paths = {"source", "target", "expect"}
    if not override_source:
        kwargs = {**kwargs, "source": None}
    if kwargs.get("require"):  # parsed here, so an error names the flag, not the config
        kwargs = {**kwargs, "require": Requirements.parse(kwargs["require"])}
    return {k: (str(Path(v).absolute()) if k in paths else v) for k, v in kwargs.items() if v is not None}


def _print(as_json: bool, data: Callable[[], Any], text: Callable[[], str]) -> None:
    """Print the JSON form or the text; only the one printed is built (a plan of 200,000 tensors takes seconds to render)."""
    click.echo(json.dumps(data(), indent=2) if as_json else text())


CONFIG = click.argument("config", type=click.Path(dir_okay=False))
PLAN_FLAGS = [
    click.option("--source", metavar="PATH", help="read this checkpoint instead of the config's source"),
    click.option("--target", metavar="PATH", help="write here instead of the config's target"),
    click.option("--from", "from_version", metavar="VERSION", help="the source's version (rules: in the config); detected when omitted"),
    click.option("--to", "to_version", metavar="VERSION", help="the version to produce (rules: in the config)"),
    click.option("--verbose", "-v", is_flag=True, help="list every key instead of folded patterns"),
    JSON,
]


def _with(flags: list[Callable[[Callable[..., Any]], Callable[..., Any]]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for flag in reversed(flags):
            function = flag(function)
        return function

    return apply


@click.command(cls=OptionsCommand, options=_option_flags("PlanOptions"))
@CONFIG
@_with(PLAN_FLAGS)
def plan(config: str, verbose: bool, as_json: bool, **kwargs: Any) -> None:
    """Show the plan of a config without reading tensor data.

    CONFIG is a YAML, TOML or JSON pipeline (any other suffix is read as YAML).
    Paths in CONFIG are relative to its folder; paths given here, to the current directory.
    """
    from .api import plan as make_plan
    from .api import target_writer
    from .config import load_config
    from .execute.estimate import estimate
    from .options import PlanOptions

    settings = load_config(config, **_overrides(kwargs, True))
    built = make_plan(settings.source, settings.pipeline(), **settings.options(PlanOptions))
    writer = target_writer(built, settings.target, format=settings.format, shard_size=settings.shard_size, metadata=settings.metadata) if settings.target else None
    built.estimate = estimate(built, settings.target, writer)
    _print(as_json, built.to_dict, lambda: built.render(verbose))


@click.command(cls=OptionsCommand, options=_option_flags("RunOptions"))
@CONFIG
@_with(PLAN_FLAGS)
@click.option("--dry-run", is_flag=True, help="plan, check and estimate only; write nothing")
@click.option(
    "--inverse",
    is_flag=True,
    help="run the config's inverse: read --source (a converted checkpoint), write --target; the config's own source "
    "tells the original layout (its metadata: is not written)",
)
def run(config: str, verbose: bool, as_json: bool, dry_run: bool, inverse: bool, **kwargs: Any) -> None:
    """Run a config: plan, stream the conversion, commit atomically.

    CONFIG is a YAML, TOML or JSON pipeline. The plan is built once, shown, then run;
    the target appears only when everything was written.
    Paths in CONFIG are relative to its folder; paths given here, to the current directory.
    """
    from .api import run as run_plan
    from .api import plan as make_plan
    from .api import target_writer
    from .config import load_config
    from .errors import ConfigError, ExecutionError, SourceError
    from .execute.estimate import estimate
    from .execute.targets import TargetPolicy
    from .options import PlanOptions
    from .readers import open_source

    settings = load_config(config, **_overrides(kwargs, override_source=not inverse))
    pipeline, source = settings.pipeline(), settings.source
    if inverse:
        if not (kwargs.get("source") and kwargs.get("target")):
            raise ConfigError("--inverse needs --source (the converted checkpoint) and --target (where to write)")
        with open_source(settings.source) as original:
            pipeline = pipeline.inverse(original.metas())
        source = str(Path(kwargs["source"]).absolute())
        settings.metadata = {}
    if not settings.target:
        raise ConfigError(f"{config}: no target; set target: in the config or pass --target")
    built = make_plan(source, pipeline, **settings.options(PlanOptions))
    writer = target_writer(built, settings.target, format=settings.format, shard_size=settings.shard_size, metadata=settings.metadata)
    # Before anything is written, the bandwidth probe included; a dry run reports the verdict.
    verdict = TargetPolicy(Path(settings.target), writer.writes_folder, built.source, source, settings.overwrite).check()
    # Under torchrun every rank plans (they must agree), but only rank 0 probes the disk and speaks.
    speaks = int(os.environ.get("RANK", "0")) == 0
    if speaks:
        built.estimate = estimate(built, settings.target, writer)
    if speaks and (dry_run or not as_json):
        _print(as_json, lambda: {**built.to_dict(), "target": str(verdict)}, lambda: f"{built.render(verbose)}\n  target: {verdict}")
    if dry_run:
        if speaks and not as_json:
            click.echo("dry run: nothing was written")
        return
    try:
        report = run_plan(built, None, settings.target, writer=writer, **settings.options())
    except SourceError as e:  # a source that failed or changed while streaming: the run failed (exit 1)
        raise ExecutionError(str(e)) from None
    if speaks:
        done = {"target": str(report.target), "files": [str(f) for f in report.files], "replaced": report.replaced}
        _print(as_json, lambda: done, report.render)


@click.command()
@click.argument("path", type=click.Path())
@JSON
@click.option("--lineage", is_flag=True, help="also list, per tensor, the source tensors and operations that made it")
def inspect(path: str, as_json: bool, lineage: bool) -> None:
    """Keys, shapes and dtypes of a checkpoint, read from headers only.

    PATH is a safetensors file or shard folder, a torch pickle or a GGUF file.
    Numbered layers are folded into ranges.
    """
    from .analysis import analyze

    report = analyze("summary", path)
    _print(as_json, report.to_dict, report.render)
    if lineage and not as_json:
        recorded = report.data.get("lineage", {})
        click.echo("lineage:" if recorded else "lineage: none recorded")
        for key, entry in recorded.items():
            click.echo(f"  {key} <- {', '.join(entry['from']) or '(new)'}: {' -> '.join(entry['ops'])}")


@click.command()
@click.argument("analysis")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@JSON
def analyze(analysis: str, paths: tuple[str, ...], as_json: bool) -> None:
    """Run an analysis on checkpoints.

    ANALYSIS is its name (summary, or one a plugin provides: see `statebridge plugins`);
    PATHS are the checkpoints it reads.
    """
    from .analysis import analyze as run_analysis

    report = run_analysis(analysis, *paths)
    _print(as_json, report.to_dict, report.render)


@click.command()
@JSON
def plugins(as_json: bool) -> None:
    """List installed plugins and what each provides.

    Each plugin with its distribution and version, and the transforms, writers,
    gates, analyses and commands it registered (or why it failed to load).
    """
    from .plugins import installed

    loaded = installed()
    loaded.collect_all()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in loaded.info], indent=2))
        return
    for p in loaded.info:
        status = f"  FAILED: {p.error}" if p.error else ""
        click.echo(f"{p.name} ({p.label}){status}")
        provided = {kind: names for kind, names in p.provides.items() if names}
        for kind, names in provided.items():
            click.echo(f"  {kind}: {', '.join(names)}")
        if not provided and not p.error:
            click.echo("  provides nothing yet")


@click.command()
def schema() -> None:
    """Print the JSON schema of config files.

    It includes every installed transform's parameters, for editors that validate YAML.
    """
    from .config import config_schema

    click.echo(json.dumps(config_schema(), indent=2))


@hookimpl
def register_commands(register):
    for command in (inspect, analyze, plan, run, plugins, schema):
        register(command)
