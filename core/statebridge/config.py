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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError, StatebridgeError
from .options import RunOptions
from .plugins import installed
from .trust.versions import Rule, Version, VersionGraph
from .transforms.base import PATH_FIELD, format_validation_error, usable_path
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

    @field_validator("source", "target")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else usable_path(value)

    @field_validator("expect")
    @classmethod
    def _expect(cls, value: str | list[str] | None) -> str | list[str] | None:
        return usable_path(value) if isinstance(value, str) else value

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


#: the most values a config may hold once YAML aliases are expanded (a few aliases that each
#: repeat the last many times over, the "billion laughs", would otherwise take minutes and gigabytes)
MAX_CONFIG_VALUES = 1_000_000
#: how deeply mappings and lists may nest in a config (nested pipelines need a handful of levels)
MAX_CONFIG_DEPTH = 100


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML, TOML or JSON file into a mapping (by suffix; YAML otherwise).

    The text must be UTF-8 (a byte-order mark is allowed), and the parsed config
    is bounded: at most :data:`MAX_CONFIG_VALUES` values with YAML aliases
    expanded and :data:`MAX_CONFIG_DEPTH` levels of nesting, checked before
    anything else looks at it.
    """
    path = Path(path)
    kind = {".toml": "TOML", ".json": "JSON"}.get(path.suffix, "YAML")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: a config must be UTF-8 text; byte {e.start} is {raw[e.start:e.start + 1]!r}") from None
    try:
        if kind == "TOML":
            data = tomllib.loads(text)
        elif kind == "JSON":
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_BoundedLoader)
    except _TooDeep:
        raise ConfigError(f"{path}: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        context = f"{e.context}: " if e.context else ""
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {context}{e.problem}{where}") from None
    except (yaml.YAMLError, ValueError) as e:  # TOML and JSON decode errors are ValueErrors, as are 5000-digit ints
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or kind}: {' '.join(str(e).split())}") from None
    except RecursionError:  # JSON and TOML nested thousands deep, before the bound below can look
        raise ConfigError(f"{path}: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping with source, target and steps")
    _check_bounds(data, path)
    return dict(data)


class _TooDeep(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stopped at MAX_CONFIG_DEPTH levels of nesting.

    Its scanner does work proportional to the nesting depth for every token, so a few thousand
    ``[`` took seconds before the composer ran out of recursion; stopped early, it stays linear.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_bounds(data: Any, path: Path) -> None:
    """Refuse a config that nests past MAX_CONFIG_DEPTH or, aliases expanded, holds more than MAX_CONFIG_VALUES values.

    YAML aliases share one object, so each list and mapping is measured once
    (values it holds with aliases expanded, levels below it) and its measure
    reused wherever it recurs: an alias bomb is refused without expanding it,
    and an alias that contains itself is refused too.
    """
    measured: dict[int, tuple[int, int]] = {}  # id -> (values with aliases expanded, nesting depth)
    open_: set[int] = set()  # containers whose contents are being measured (the current path)
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, children_done = stack.pop()
        items = _items(value)
        if items is None or (not children_done and id(value) in measured):
            continue
        if children_done:
            sizes = [measured[id(item)] if _items(item) is not None else (1, 0) for item in items]
            count, depth = 1 + sum(n for n, _ in sizes), 1 + max((d for _, d in sizes), default=0)
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{path}: nested more than {MAX_CONFIG_DEPTH} levels deep")
            if count > MAX_CONFIG_VALUES:
                raise ConfigError(
                    f"{path}: the config holds more than {MAX_CONFIG_VALUES:,} values once its YAML aliases are "
                    "expanded; refusing it (an alias bomb?)"
                )
            measured[id(value)] = (count, depth)
            open_.discard(id(value))
            continue
        if id(value) in open_:
            raise ConfigError(f"{path}: a YAML alias refers to a list or mapping that contains it")
        open_.add(id(value))
        stack.append((value, True))
        stack.extend((item, False) for item in items)


def _items(value: Any) -> list[Any] | None:
    """The values a list or mapping holds; None for anything else."""
    if isinstance(value, Mapping):
        return list(value.values())
    return value if isinstance(value, list) else None


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
        raise ConfigError(f"{name}: {format_validation_error(e, '')}") from None
    except ConfigError as e:
        raise e.within(name) from None
    try:
        if base is not None:
            written = config.source
            config.source = _resolve(config.source, base, "source")
            if not Path(config.source).exists():
                relative = "" if Path(written).expanduser().is_absolute() else " (paths in a config are relative to its folder)"
                raise ConfigError(f"source {written!r} is {config.source}, which does not exist{relative}")
            if config.target:
                config.target = _resolve(config.target, base, "target")
            if isinstance(config.expect, str):
                config.expect = _resolve(config.expect, base, "expect")
            config.steps = [_resolve_step_paths(step, base, f"steps[{i}]") for i, step in enumerate(config.steps)]
            for r, rule in enumerate(config.rules):
                rule.steps = [_resolve_step_paths(step, base, f"rules[{r}].steps[{i}]") for i, step in enumerate(rule.steps)]
        config.pipeline()
    except StatebridgeError as e:
        raise e.within(name) from None
    return config


def _resolve(value: str, base: Path, where: str) -> str:
    """``value`` as a path: ``~`` and ``~user`` expanded, a relative one joined to ``base``."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~nosuchuser, or no home folder at all
        raise ConfigError(f"{where}: cannot expand {value!r}: no such user, or no home folder") from None
    return os.path.normpath(path if path.is_absolute() else base / path)


def _resolve_step_paths(step: Any, base: Path, where: str) -> Any:
    """Rewrite the path-typed params of a config-form step (and nested steps) against ``base``.

    A param is a path when its annotation holds a :data:`~statebridge.transforms.base.PathParam`
    anywhere: ``PathParam``, ``PathParam | None``, ``list[PathParam]``, ``dict[str, PathParam]``.
    """
    transforms = installed().transforms
    if not isinstance(step, Mapping) or len(step) != 1:
        return step
    ((name, params),) = step.items()
    if not isinstance(name, str) or name not in transforms or not isinstance(params, Mapping):
        return step
    params = dict(params)
    for field_name, info in transforms.get(name).Params.model_fields.items():
        key = info.alias or field_name
        if key in params:
            annotation = _annotation(info)
            label = f"{where}: {name}.{key}"
            params[key] = _resolve_paths(annotation, params[key], lambda value, label=label: _resolve(value, base, label))
    if isinstance(params.get("steps"), list):
        params["steps"] = [_resolve_step_paths(s, base, f"{where}: {name}.steps[{i}]") for i, s in enumerate(params["steps"])]
    return {name: params}


def _resolve_paths(annotation: Any, value: Any, resolve: Callable[[str], str]) -> Any:
    """``value`` with every string that ``annotation`` types as a path passed through ``resolve``."""
    for arm in _arms(annotation):
        if isinstance(value, str) and _is_path(arm):
            return resolve(value)
        items = [a for a in get_args(arm) if a is not Ellipsis]
        if isinstance(value, list) and get_origin(arm) in (list, tuple, set, frozenset, Sequence) and len(items) == 1:
            return [_resolve_paths(items[0], item, resolve) for item in value]
        if isinstance(value, Mapping) and get_origin(arm) in (dict, Mapping) and len(items) == 2:
            return {k: _resolve_paths(items[1], item, resolve) for k, item in value.items()}
        if isinstance(value, Mapping) and isinstance(arm, type) and issubclass(arm, BaseModel):
            return {**value, **{  # a nested params model (``adapters: [{path, weight}]``): its own path fields
                key: _resolve_paths(_annotation(info), value[key], resolve)
                for name, info in arm.model_fields.items() if (key := info.alias or name) in value
            }}
    return value


def _annotation(info: Any) -> Any:
    """A pydantic field's annotation with its metadata (where :data:`PathParam` leaves its mark)."""
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def _arms(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly optional, possibly annotated) type; a path type stays whole."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return [arm for alternative in get_args(annotation) for arm in _arms(alternative)]
    if origin is Annotated and not _is_path(annotation):
        return _arms(get_args(annotation)[0])
    return [annotation]


def _is_path(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated and PATH_FIELD in get_args(annotation)[1:]


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
