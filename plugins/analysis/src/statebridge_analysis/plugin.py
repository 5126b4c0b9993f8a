"""The statebridge-analysis plugin: ``statebridge lint``, ``diff`` and ``automap``, the ``permute_rows``
transform, and "did you mean" for the core's errors (the ``suggest_keys`` hook).

statebridge imports this module at start-up (``statebridge --help`` included), so it holds
only the click commands and hooks; their work is imported inside them, and header-only work
(``diff``, ``automap`` against a checkpoint or key list, and ``lint`` of safetensors and plain
GGUF files without ``--model``) never imports torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import click

import statebridge


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--model", metavar="FOLDER_OR_CONFIG", help="check against this model (a folder with config.json, or the file); "
              "default: CHECKPOINT's own config.json when it is a model folder and transformers is installed")
@click.option("--no-model", is_flag=True, help="do not check against CHECKPOINT's own config.json")
@click.option("--write-manifest", "write_to", metavar="FILE", type=click.Path(dir_okay=False),
              help="write every tensor's sha256 (of its stored bytes), shape and dtype to FILE (JSON)")
@click.option("--verify", "verify_with", metavar="FILE", type=click.Path(dir_okay=False),
              help="compare every tensor with the manifest FILE; each one that differs is an error")
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
def lint(checkpoint: str, model: str | None, no_model: bool, write_to: str | None, verify_with: str | None, as_json: bool) -> None:
    """Find NaN/Inf, duplicates, odd layers and model mismatches in CHECKPOINT.

    Reports NaN/Inf, all-zero and duplicate tensors, layers unlike their siblings, mixed dtypes,
    and, against a model, orphan, missing and untied keys. Reports only, never fixes.
    Reads every tensor once, a few MB at a time. Exits 1 when there are errors (for CI), 0 otherwise.
    """
    from .lint import lint as run_lint
    from .lint import manifest, read_manifest, write_manifest

    if model and no_model:
        raise statebridge.ConfigError("--model and --no-model contradict each other; give one")
    recorded = read_manifest(verify_with) if verify_with else None
    expected = None
    if model or (not no_model and _own_config(checkpoint)):
        from .model import expected_from_config

        try:
            expected = expected_from_config(model or checkpoint)
        except statebridge.StatebridgeError as e:
            if model:
                raise
            # found, not asked for: lint the checkpoint alone, and say why
            click.echo(f"statebridge: warning: not checking against {checkpoint}'s config.json ({e}); give --model or --no-model", err=True)
    with statebridge.open_source(checkpoint) as source:
        report, scans = run_lint(source, expected, recorded)
        if write_to:
            write_manifest(manifest(source, scans), write_to)
            report.manifest_written = write_to
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    if report.errors:
        click.get_current_context().exit(1)  # errors fail CI; warnings alone pass


def _own_config(checkpoint: str) -> bool:
    """Whether CHECKPOINT is a folder with a config.json and transformers is installed (found without importing it)."""
    folder = Path(checkpoint)
    return folder.is_dir() and (folder / "config.json").is_file() and importlib.util.find_spec("transformers") is not None


@click.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print every change (and the folded table) as JSON")
@click.option("--content", is_flag=True, help="also read every tensor (streamed, a chunk at a time): confirm or refute each "
              "pairing by hashes, pair renames by content, find transposes and row permutations, measure changed values")
@click.option("--html", "html_to", metavar="FILE", type=click.Path(dir_okay=False),
              help="also write the folded diff as one self-contained HTML page (counts, patterns coloured by kind)")
@click.option("--emit-rules", "rules_to", metavar="FILE", type=click.Path(dir_okay=False),
              help="write a pipeline config (YAML) whose steps turn A into B, to review; with --content, from the content "
              "pairing (renames by values, transposes, row permutations); reads the first layer of each merge or split to order its parts")
def diff(a: str, b: str, as_json: bool, content: bool, html_to: str | None, rules_to: str | None) -> None:
    """Compare two checkpoints from headers: renames, moves, merges, splits.

    Every tensor of A and B is classified: unchanged, moved, renamed, merged, split, dtype or shape
    changed, added, removed; the output is folded by layer pattern.

    A and B are any checkpoints statebridge reads (safetensors, shards, .pt, GGUF). No tensor data is read
    (but for --emit-rules' merges and splits) unless --content is given.
    """
    from .diff import compare

    with statebridge.open_source(a) as source_a, statebridge.open_source(b) as source_b:
        report = compare(source_a, source_b)
        if content:
            from .content import content_diff

            report = content_diff(report, source_a, source_b)
        if rules_to:  # from the content pairing when there is one: renames by values, transposes, permutations
            from .emit import emit_rules

            text, problems = emit_rules(report, source_a, source_b)
            _write(rules_to, text, "rules")
    if html_to:
        from .html import render_html

        _write(html_to, render_html(report), "page")
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())
    if rules_to:
        _warn_problems(rules_to, problems, "A", "B", "names, shapes and dtypes")


@click.command()
@click.argument("source", type=click.Path())
@click.option("--target", "target", required=True, metavar="T",
              help="what the keys should become: a checkpoint, a key list (text: key, or key<TAB>shape<TAB>dtype, a line), "
              "a model folder's config.json (built on the meta device through transformers), or module:factory (returns an nn.Module)")
@click.option("--emit-rules", "rules_to", metavar="FILE", type=click.Path(dir_okay=False),
              help="write the candidate rules as a pipeline config (YAML) to review and run")
@click.option("--json", "as_json", is_flag=True, help="print the candidate rules and the coverage as JSON")
def automap(source: str, target: str, rules_to: str | None, as_json: bool) -> None:
    """Suggest rules that turn SOURCE's keys into the target's, scored by name similarity and shape.

    Prints each candidate rule (renames over layer numbers, merges, splits) with its score, and the
    coverage the rules would reach: how many source and target keys they match, and which are left.
    Never applies them: --emit-rules writes them as a config for a person to review. Reads headers only
    (and, for a checkpoint target, the first layer of each merge or split to order its parts).
    """
    from .automap import automap as run_automap
    from .automap import compared_text, read_target
    from .emit import emit_rules

    wanted = read_target(target)
    with statebridge.open_source(source) as opened:
        found, ma, mb = run_automap(opened.metas(), opened.name, wanted)
        if rules_to:  # a checkpoint target is opened again: its values order the parts of a merge
            with statebridge.open_source(wanted.checkpoint) if wanted.checkpoint else contextlib.nullcontext() as values:
                text, problems = emit_rules(found.report, opened, values, metas=(ma, mb), compared=wanted.compared,
                                            made_by="statebridge automap SRC --target T --emit-rules", filled=found.filled())
            _write(rules_to, text, "rules")
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else found.render())
    if rules_to:
        _warn_problems(rules_to, problems, "the source", "the target", compared_text(wanted))


def _write(path: str, text: str, what: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise statebridge.SourceError(path, f"cannot write the {what}: {e.strerror or e}") from None


def _warn_problems(rules_to: str, problems: list[str], source: str, other: str, compared: str) -> None:
    """The ways the emitted rules, planned against the source, differ from what they should make (or that they match)."""
    for problem in problems[:20]:
        click.echo(f"statebridge: warning: rules in {rules_to}: {problem}", err=True)
    if len(problems) > 20:
        click.echo(f"statebridge: warning: rules in {rules_to}: ... and {len(problems) - 20} more differences from {other}", err=True)
    if not problems:
        click.echo(f"rules written to {rules_to}; planned against {source}, they give {other}'s {compared}", err=True)


@statebridge.hookimpl
def register_transforms(register):
    from .transforms import PermuteRows

    register(PermuteRows)


@statebridge.hookimpl
def suggest_keys(unmatched, candidates):
    """Did you mean: the target's keys nearest to each unmatched key, by name (the diff's similarity) and shape."""
    from .suggest import nearest

    return nearest(unmatched, candidates)


@statebridge.hookimpl
def register_commands(register):
    register(lint)
    register(diff)
    register(automap)
