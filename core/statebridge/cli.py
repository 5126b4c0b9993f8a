"""The ``statebridge`` command line.

Every error statebridge raises on purpose is printed as one line (or a short
list) naming the file, key or step, with no traceback, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .analyze import analyze
from .api import plan, run, target_writer
from .config import RunConfig, config_schema, load_config, parse_size
from .coverage import Requirements
from .errors import StatebridgeError
from .estimate import estimate
from .io import open_source
from .plan import Plan
from .plugins import load_plugins
from .targets import TargetPolicy
from .writers.base import Writer


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args) or 0
    except StatebridgeError as e:
        print(f"statebridge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("statebridge: interrupted; the target was left as it was", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``statebridge plan c.yaml | head``): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statebridge", description="Declarative, checked, streaming transformations of PyTorch model state.")
    parser.add_argument("--version", action="version", version=f"statebridge {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="keys, shapes and dtypes of a checkpoint, layers folded into ranges")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--lineage", action="store_true", help="also list, per tensor, the source tensors and operations that made it")
    p.set_defaults(func=_inspect)

    for name, helptext in (("plan", "show the plan of a config without reading tensor data"), ("run", "run a config: stream the conversion, commit atomically")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="YAML, TOML or JSON pipeline config")
        p.add_argument("--source", help="override the config's source")
        p.add_argument("--target", help="override the config's target")
        p.add_argument("--format", help="override the output format")
        p.add_argument("--shard-size", help="largest shard, e.g. 2GB")
        p.add_argument("--from", dest="from_version", help="the source's version (rules: in the config); detected when omitted")
        p.add_argument("--to", dest="to_version", help="the version to produce (rules: in the config)")
        p.add_argument("--require", help="invariants, e.g. coverage=1.0,no_missing,no_extra")
        p.add_argument("--expect", help="target spec: a checkpoint whose keys, shapes and dtypes the result must match")
        p.add_argument("--on-collision", choices=["error", "warn"], help="two writers of one key: fail (default) or keep the last")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--verbose", "-v", action="store_true", help="list every key instead of folded patterns")
        if name == "run":
            p.add_argument("--dry-run", action="store_true", help="plan and check only; write nothing")
            p.add_argument(
                "--overwrite",
                action="store_true",
                default=None,
                help="replace an existing target that statebridge did not write, or the source itself (atomically)",
            )
            p.add_argument("--max-memory", help="memory budget for tensors in flight, e.g. 4GB")
            p.add_argument("--workers", type=int, help="threads for reading, computing and writing")
            p.add_argument(
                "--no-fsync",
                dest="durable",
                action="store_false",
                default=None,
                help="commit without fsync: still atomic, but like cp not safe against a power cut; faster",
            )
            p.add_argument(
                "--inverse",
                action="store_true",
                help="run the config's inverse: read --source (a converted checkpoint), write --target; "
                "the config's own source tells the original layout (its metadata: is not written)",
            )
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=_plan if name == "plan" else _run)

    p = sub.add_parser("plugins", help="installed plugins, versions, transforms, writers and hooks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plugins)

    p = sub.add_parser("schema", help="JSON schema of the config file")
    p.set_defaults(func=lambda a: print(json.dumps(config_schema(), indent=2)))

    p = sub.add_parser("analyze", help="run an analysis (summary, or one a plugin provides)")
    p.add_argument("analysis")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_analyze)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"statebridge: warning: {message}", file=sys.stderr)


def _inspect(args: argparse.Namespace) -> None:
    report = analyze("summary", args.path)
    _print_report(report, args.json)
    if args.lineage and not args.json:
        lineage = report.data.get("lineage", {})
        print("lineage:" if lineage else "lineage: none recorded")
        for key, entry in lineage.items():
            print(f"  {key} <- {', '.join(entry['from']) or '(new)'}: {' -> '.join(entry['ops'])}")


def _analyze(args: argparse.Namespace) -> None:
    _print_report(analyze(args.analysis, *args.paths), args.json)


def _print_report(report, as_json: bool) -> None:
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.render())


def _load(args: argparse.Namespace, override_source: bool = True):
    """The config with the command line's overrides (paths on the command line are relative to the cwd)."""
    shard_size = parse_size(args.shard_size) if args.shard_size else None
    source = str(Path(args.source).absolute()) if args.source and override_source else None
    target = str(Path(args.target).absolute()) if args.target else None
    extra = {
        "max_memory": getattr(args, "max_memory", None),
        "workers": getattr(args, "workers", None),
        "durable": getattr(args, "durable", None),
        "overwrite": getattr(args, "overwrite", None),
        "require": Requirements.parse(args.require) if args.require else None,
        "expect": str(Path(args.expect).absolute()) if args.expect else None,
        "on_collision": args.on_collision,
        "from": args.from_version,
        "to": args.to_version,
    }
    return load_config(args.config, source=source, target=target, format=args.format, shard_size=shard_size, **extra)


def _plan(args: argparse.Namespace) -> None:
    config = _load(args)
    built = plan(config.source, config.pipeline(), format=config.format, shard_size=config.shard_size, **config.checks())
    built.estimate = estimate(built, config.target, _writer(built, config) if config.target else None)
    print(json.dumps(built.to_dict(), indent=2) if args.json else built.render(args.verbose))


def _writer(built: Plan, config: RunConfig, inverse: bool = False) -> Writer:
    """The writer a run of this config would use, for the dry run's list of files."""
    metadata = None if inverse else config.metadata
    return target_writer(built, config.target, format=config.format, shard_size=config.shard_size, metadata=metadata)


def _run(args: argparse.Namespace) -> None:
    config = _load(args, override_source=not args.inverse)
    pipeline, source = config.pipeline(), config.source
    if args.inverse:
        if not (args.source and args.target):
            raise StatebridgeError("--inverse needs --source (the converted checkpoint) and --target (where to write)")
        with open_source(config.source) as original:
            pipeline = pipeline.inverse(original.metas())
        source = str(Path(args.source).absolute())
    if not config.target:
        raise StatebridgeError(f"{args.config}: no target; set target: in the config or pass --target")
    built = plan(source, pipeline, format=config.format, shard_size=config.shard_size, **config.checks())
    writer = _writer(built, config, inverse=args.inverse)
    # Before anything is written, the bandwidth probe included; a dry run reports the verdict.
    verdict = TargetPolicy(Path(config.target), writer.writes_folder, built.source, source, config.overwrite).check()
    # Under torchrun every rank plans (they must agree), but only rank 0 probes the disk and speaks.
    speaks = int(os.environ.get("RANK", "0")) == 0
    if speaks:
        built.estimate = estimate(built, config.target, writer)
    if speaks and (args.dry_run or not args.json):
        shown = {**built.to_dict(), "target": str(verdict)}
        print(json.dumps(shown, indent=2) if args.json else f"{built.render(args.verbose)}\n  target: {verdict}")
    if args.dry_run:
        return
    report = run(
        source,
        pipeline,
        Path(config.target),
        format=config.format,
        shard_size=config.shard_size,
        metadata=None if args.inverse else config.metadata,
        progress=False if args.no_progress else None,
        gates=config.gates,
        max_memory=config.max_memory,
        workers=config.workers,
        durable=config.durable,
        overwrite=config.overwrite,
        **config.checks(),
    )
    if speaks:
        done = {"target": str(report.target), "files": [str(f) for f in report.files], "replaced": report.replaced}
        print(json.dumps(done) if args.json else report.render())


def _plugins(args: argparse.Namespace) -> None:
    info = load_plugins().info
    if args.json:
        print(json.dumps([vars(p) for p in info], indent=2))
        return
    for p in info:
        status = f"  FAILED: {p.error}" if p.error else ""
        print(f"{p.name} ({p.distribution} {p.version}){status}")
        for label, items in (("transforms", p.transforms), ("writers", p.writers), ("analyses", p.analyses), ("hooks", p.hooks)):
            if items:
                print(f"  {label}: {', '.join(items)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
