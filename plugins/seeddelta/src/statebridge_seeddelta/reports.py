"""Build reports on disk: read one back to add to it, write one whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from statebridge import ConfigError


def read(path: str | os.PathLike[str], flag: str) -> dict[str, Any]:
    """The build report at ``path`` (``flag`` names the option it came from in errors)."""
    where = Path(path)
    try:
        report = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {where}: cannot read it as a build report: {e}") from None
    if not isinstance(report, dict) or "layers" not in report:
        raise ConfigError(f"{flag} {where}: not a seeddelta build report (no 'layers')")
    return report


def write(path: str | os.PathLike[str], report: dict[str, Any], flag: str) -> None:
    """Write ``report`` as JSON through a partial file renamed into place: it appears whole, or not at all."""
    where = Path(path)
    partial = where.with_name(f"{where.name}.{os.getpid()}.part")
    try:
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, where)
    except OSError as e:
        raise ConfigError(f"{flag} {where}: cannot write it: {e.strerror or e}") from None
    finally:
        partial.unlink(missing_ok=True)
