"""The ``statebridge`` command: a click group whose commands every plugin registers, the core's included.

Every error statebridge raises on purpose is printed as one line (or a short
list) naming the file, key, step or flag, with no traceback: exit status 2 for
bad input (config, checkpoint, flags), 1 for a run that failed while writing.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import click

from ._version import __version__
from .errors import ExecutionError, StatebridgeError
from .plugins import installed

CORE = "statebridge"


class PluginCommands(click.Group):
    """The commands of every loaded plugin; ``--help`` lists each with the plugin that gave it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return installed().commands.names()

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        commands = installed().commands
        return commands.get(name) if name in commands else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands = installed().commands
        rows = []
        for name in commands.names():
            plugin = getattr(commands.owner(name), "name", CORE)
            help_text = commands.get(name).get_short_help_str(limit=70)
            rows.append((name, help_text + ("" if plugin == CORE else f"  [{plugin}]")))
        failed = [p for p in installed().info if p.error]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
        if failed:
            with formatter.section("Plugins that failed to load"):
                formatter.write_dl([(p.name, p.error or "") for p in failed])


@click.group(cls=PluginCommands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="statebridge", message="%(prog)s %(version)s")
def cli() -> None:
    """Declarative, checked, streaming transformations of PyTorch model state.

    Plugins add commands (`statebridge plugins` lists what each plugin provides).
    """


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status instead of raising (``statebridge`` and ``python -m statebridge``)."""
    warnings.showwarning = _show_warning
    try:
        # without standalone mode click returns what a command's ``ctx.exit(code)`` asked for
        status = cli.main(args=list(argv) if argv is not None else None, prog_name="statebridge", standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return status if isinstance(status, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        print("statebridge: interrupted; the target was left as it was", file=sys.stderr)
        return 130
    except StatebridgeError as e:
        print(f"statebridge: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ExecutionError) else 2
    except KeyboardInterrupt:
        print("statebridge: interrupted; the target was left as it was", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``statebridge plan c.yaml | head``): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"statebridge: warning: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
