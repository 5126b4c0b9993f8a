"""The options of a plan and of a run, declared once for the config file, the Python API and the CLI.

:class:`RunOptions` fields are the keyword arguments of :func:`statebridge.run`,
the keys of a config file (:class:`statebridge.config.RunConfig` extends it) and,
where a field names a ``cli`` flag, the options of ``statebridge plan`` / ``run``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .transforms.base import format_validation_error
from .tensors.provenance import user_metadata
from .trust.coverage import Requirements

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"512MiB"`` -> 536_870_912, ``1000`` -> 1000."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"cannot read size {value!r}; write it like 2GB, 500MB or 512MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if not match:
            raise ConfigError(f"cannot read size {value!r}; write it like 2GB, 500MB or 512MiB")
        number, unit = match.groups()
        size = int(float(number) * _UNITS[(unit or "B").upper()])
    if size < 1:  # 0 is not "the default" and a negative number is not "tiny"
        raise ConfigError(f"size {value!r} is less than one byte; leave the option out for its default")
    return size


def _size(field: str, value: Any) -> int:
    try:
        return parse_size(value)
    except ConfigError as e:
        raise e.within(field) from None


def cli(flag: str, **click: Any) -> dict[str, Any]:
    """Field metadata naming the command-line flag of an option (and extra ``click.option`` arguments)."""
    return {"cli": {"flag": flag, **click}}


class PlanOptions(BaseModel):
    """What a plan is checked against (``statebridge plan`` and :func:`statebridge.plan`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)

    require: Requirements = Field(
        default_factory=Requirements,
        description="invariants, e.g. coverage=1.0,no_missing,no_extra",
        json_schema_extra=cli("--require", metavar="LIST"),
    )
    expect: Any = Field(
        None,
        description="target spec: a checkpoint (or module, or key list) whose keys, shapes and dtypes the result must match",
        json_schema_extra=cli("--expect", metavar="PATH"),
    )
    on_collision: Literal["error", "warn"] = Field(
        "error", description="two writers of one key: fail, or keep the last with a warning", json_schema_extra=cli("--on-collision")
    )
    gates: dict[str, Any] = Field(default_factory=dict, description="gates to apply to computed tensors, e.g. {finite: true}")
    format: str | None = Field(
        None, description="output format (safetensors, torch, gguf, or a plugin's); guessed from the target", json_schema_extra=cli("--format", metavar="FORMAT")
    )
    shard_size: int | None = Field(
        None, description="largest shard of a folder target, e.g. 2GB", json_schema_extra=cli("--shard-size", metavar="SIZE")
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="metadata fields to set in the output (text; numbers, booleans and lists for GGUF) or, given null, "
        "to delete from what the source carries (no statebridge.* key: those are the run's provenance)",
    )

    @field_validator("require", mode="before")
    @classmethod
    def _require(cls, value: Any) -> Any:
        return Requirements.parse(value) if isinstance(value, str) else value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"metadata must be a mapping of field names to values, not {type(value).__name__}")
        return user_metadata(value)

    @field_validator("shard_size", mode="before")
    @classmethod
    def _shard_size(cls, value: Any) -> Any:
        return None if value is None else _size("shard_size", value)


class RunOptions(PlanOptions):
    """How a run streams and commits (``statebridge run`` and :func:`statebridge.run`)."""

    max_memory: int | None = Field(
        None,
        description="memory budget for tensors in flight, e.g. 4GB (default: a safe share of available RAM)",
        json_schema_extra=cli("--max-memory", metavar="SIZE"),
    )
    workers: int = Field(1, ge=1, description="threads for reading, computing and writing", json_schema_extra=cli("--workers", metavar="N"))
    durable: bool = Field(
        True,
        description="fsync before committing (false: atomic but, like cp, not safe against a power cut; faster)",
        json_schema_extra=cli(
            "--no-fsync", flag_value=False, help="commit without fsync: still atomic, but like cp not safe against a power cut; faster"
        ),
    )
    overwrite: bool = Field(
        False,
        description="replace an existing target statebridge did not write, or the source itself (atomically)",
        json_schema_extra=cli("--overwrite", flag_value=True),
    )
    progress: bool | None = Field(
        None, description="progress bar (default: when stderr is a terminal)", json_schema_extra=cli("--no-progress", flag_value=False, help="no progress bar")
    )
    distributed: bool | None = Field(
        None, description="share the work over torchrun's ranks (default: when started by torchrun)"
    )

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> Any:
        return None if value is None else _size("max_memory", value)


def validated(model: type[BaseModel], values: Mapping[str, Any], where: str = "") -> Any:
    """``model`` built from ``values``; a problem is one ConfigError line per field, naming it."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None
