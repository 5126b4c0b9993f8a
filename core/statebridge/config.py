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

from .errors import ConfigError, StatebridgeError
from .options import RunOptions
from .plugins import installed
from .trust.versions import Rule, Version, VersionGraph
from .transforms.base import PATH_FIELD, format_validation_error
from .transforms.composite import Pipeline, build_steps

class RunConfig(RunOptions):
    """A pipeline run: where from, where to, the steps, and the run options (:class:`RunOptions`)."""

    source: str = Field(description="checkpoint to read: file, shard folder, torch pickle or GGUF")
    target: str | None = Field(None, description="where to write; a folder for sharded safetensors")
    steps: list[dict[str, Any]] = Field(default_factory=list, description="transforms, each {name: params}")
    expect: str | list[str] | None = Field(None, description="target spec: a checkpoint path or a list of keys")
    versions: dict[str, Version] = Field(default_factory=dict, description="named layouts, recognised by key signature")
    rules: list[Rule] = Field(default_factory=list, description="steps between versions: {from, to, steps}")
    from_version: str | None = Field(None, alias="from", description="the source's version (detected when omitted)")
    to_version: str | None = Field(None, alias="to", description="the version to produce")

    def pipeline(self) -> Pipeline:
        """The steps, or the shortest chain of rules from ``from`` to ``to`` as one pipeline."""
        if not self.rules:
            if self.to_version or self.from_version:
                raise ConfigError("from/to name versions, but the config has no rules: between versions")
            return Pipeline(build_steps(self.steps, installed().transforms))
        if self.steps:
            raise ConfigError("give either steps: or rules: with from/to, not both")
        if not self.to_version:
            raise ConfigError(f"the config has rules between versions ({', '.join(self.graph().versions) or '...'}); choose the target with to: or --to")
        graph = self.graph()
        start = self.from_version
        if start is None:
            from .readers import open_source

            with open_source(self.source) as source:
                start = graph.detect(source.metas())
        return graph.pipeline(start, self.to_version, installed().transforms)

    def graph(self) -> VersionGraph:
        return VersionGraph(self.versions, self.rules)

    def options(self, model: type[RunOptions] = RunOptions) -> dict[str, Any]:
        """The options this config sets, as keyword arguments of :func:`statebridge.run` (or ``plan``)."""
        return {name: getattr(self, name) for name in model.model_fields}


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
        written = config.source
        config.source = _resolve(config.source, base)
        if not Path(config.source).exists():
            relative = "" if Path(written).expanduser().is_absolute() else " (paths in a config are relative to its folder)"
            raise ConfigError(f"{name}: source {written!r} is {config.source}, which does not exist{relative}")
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
    transforms = installed().transforms
    if not isinstance(step, Mapping) or len(step) != 1:
        return step
    ((name, params),) = step.items()
    if name not in transforms or not isinstance(params, Mapping):
        return step
    params = dict(params)
    fields = transforms.get(name).Params.model_fields
    for field_name, info in fields.items():
        if PATH_FIELD in info.metadata and isinstance(params.get(field_name), str):
            params[field_name] = _resolve(params[field_name], base)
    if isinstance(params.get("steps"), list):
        params["steps"] = [_resolve_step_paths(s, base) for s in params["steps"]]
    return {name: params}


def config_schema() -> dict[str, Any]:
    """JSON schema of config files, with one alternative per installed transform."""
    schema = RunConfig.model_json_schema()
    alternatives = []
    for name, cls in installed().transforms.items():
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
