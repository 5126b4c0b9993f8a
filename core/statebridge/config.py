"""Pipeline config files (YAML, TOML or JSON), validated by pydantic.

A config names a source, a target and the steps between them::

    source: ckpt/                 # paths are relative to the config file
    target: out/
    format: safetensors           # optional; guessed from the target
    shard_size: 2GB               # optional; folder targets are sharded
    metadata: {origin: llama-3}   # optional; stored in the output
    gates: {finite: true}         # optional; options for gate plugins
    steps:
      - rename: {pattern: "model.**", to: "**"}
      - concat: {inputs: [layers.*.q.weight, layers.*.k.weight, layers.*.v.weight], output: layers.*.qkv.weight}

Each step is ``{transform-name: params}``; any installed plugin's transform may
be named.  Errors point at the step and field (``steps[1] (concat).dim: ...``).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .coverage import Requirements
from .errors import ConfigError, StatebridgeError
from .versions import Rule, Version, VersionGraph
from .transforms.base import PATH_FIELD, format_validation_error
from .transforms.composite import Pipeline, build_steps

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"512MiB"`` -> 536_870_912, ``1000`` -> 1000."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"cannot read size {value!r}; write it like 2GB, 500MB or 512MiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").upper()])


class RunConfig(BaseModel):
    """A pipeline run: where from, where to, and the steps."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: str = Field(description="checkpoint to read: file, shard folder, torch pickle or GGUF")
    target: str | None = Field(None, description="where to write; a folder for sharded safetensors")
    format: str | None = Field(None, description="writer format (safetensors, torch, gguf, or a plugin's)")
    shard_size: int | None = Field(None, description="largest shard for folder targets, e.g. 2GB")
    metadata: dict[str, str] = Field(default_factory=dict, description="string metadata stored in the output")
    gates: dict[str, Any] = Field(default_factory=dict, description="options passed to gate hooks")
    max_memory: int | None = Field(None, description="memory budget for tensors in flight, e.g. 4GB (default: a safe share of available RAM)")
    workers: int = Field(1, ge=1, description="threads for reading, computing and writing groups")
    durable: bool = Field(
        True,
        description="fsync the target before committing it (false: atomic but not power-cut safe, like cp; faster)",
    )
    overwrite: bool = Field(
        False,
        description="replace an existing target statebridge did not write, or the source itself (atomically)",
    )
    steps: list[dict[str, Any]] = Field(default_factory=list, description="transforms, each {name: params}")
    require: Requirements = Field(default_factory=Requirements, description="coverage and target-spec invariants")
    expect: str | list[str] | None = Field(None, description="target spec: a checkpoint path or a list of keys")
    on_collision: Literal["error", "warn"] = Field("error", description="two writers of one key: fail, or keep the last")
    versions: dict[str, Version] = Field(default_factory=dict, description="named layouts, recognised by key signature")
    rules: list[Rule] = Field(default_factory=list, description="steps between versions: {from, to, steps}")
    from_version: str | None = Field(None, alias="from", description="the source's version (detected when omitted)")
    to_version: str | None = Field(None, alias="to", description="the version to produce")

    @field_validator("shard_size", "max_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value is None else parse_size(value)

    def pipeline(self) -> Pipeline:
        """The steps, or the shortest chain of rules from ``from`` to ``to`` as one pipeline."""
        if not self.rules:
            if self.to_version or self.from_version:
                raise ConfigError("from/to name versions, but the config has no rules: between versions")
            return Pipeline(build_steps(self.steps))
        if self.steps:
            raise ConfigError("give either steps: or rules: with from/to, not both")
        if not self.to_version:
            raise ConfigError(f"the config has rules between versions ({', '.join(self.graph().versions) or '...'}); choose the target with to: or --to")
        graph = self.graph()
        start = self.from_version
        if start is None:
            from .io import open_source

            with open_source(self.source) as source:
                start = graph.detect(source.metas())
        return graph.pipeline(start, self.to_version)

    def graph(self) -> VersionGraph:
        return VersionGraph(self.versions, self.rules)

    def checks(self) -> dict[str, Any]:
        """The plan checks this config asks for, as keyword arguments of :func:`statebridge.plan`."""
        return {"require": self.require, "expect": self.expect, "on_collision": self.on_collision}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML, TOML or JSON file into a mapping (by suffix; YAML otherwise)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping with source, target and steps")
    return dict(data)


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Read and validate a config file; paths in it are resolved against its folder."""
    path = Path(path)
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, base=path.parent, name=str(path))


def parse_config(data: Mapping[str, Any], base: Path | None = None, name: str = "config") -> RunConfig:
    """Validate a config mapping; steps are built now, so every error appears before any work."""
    try:
        config = RunConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(f"{name}: {format_validation_error(e, '')}".replace(": .", ": ")) from None
    except ConfigError as e:
        raise e.within(name) from None
    if base is not None:
        config.source = _resolve(config.source, base)
        if config.target:
            config.target = _resolve(config.target, base)
        if isinstance(config.expect, str):
            config.expect = _resolve(config.expect, base)
        config.steps = [_resolve_step_paths(step, base) for step in config.steps]
        for rule in config.rules:
            rule.steps = [_resolve_step_paths(step, base) for step in rule.steps]
    try:
        config.pipeline()
    except StatebridgeError as e:
        raise e.within(name) from None
    return config


def _resolve(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _resolve_step_paths(step: Any, base: Path) -> Any:
    """Rewrite the path-typed params of a config-form step (and nested steps) against ``base``."""
    from .plugins import registry

    if not isinstance(step, Mapping) or len(step) != 1:
        return step
    ((name, params),) = step.items()
    if name not in registry() or not isinstance(params, Mapping):
        return step
    params = dict(params)
    fields = registry().get(name).Params.model_fields
    for field_name, info in fields.items():
        if PATH_FIELD in info.metadata and isinstance(params.get(field_name), str):
            params[field_name] = _resolve(params[field_name], base)
    if isinstance(params.get("steps"), list):
        params["steps"] = [_resolve_step_paths(s, base) for s in params["steps"]]
    return {name: params}


def config_schema() -> dict[str, Any]:
    """JSON schema of config files, with one alternative per installed transform."""
    from .plugins import registry

    schema = RunConfig.model_json_schema()
    alternatives = []
    for name, cls in registry().items():
        params = cls.Params.model_json_schema()
        alternatives.append(
            {
                "type": "object",
                "title": name,
                "description": (cls.__doc__ or "").strip().split("\n")[0],
                "properties": {name: params},
                "required": [name],
                "additionalProperties": False,
            }
        )
    schema["properties"]["steps"]["items"] = {"oneOf": alternatives}
    return schema
