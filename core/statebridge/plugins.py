"""The plugin manager: default plugins, entry-point plugins, and the registries built from them.

Environment variables:

``STATEBRIDGE_LOAD_PLUGINS``
    comma-separated entry-point or distribution names: load only these plugins
    (empty string: load none). The core's default plugins always load.
``STATEBRIDGE_DISABLE_PLUGINS``
    comma-separated names to skip.
``STATEBRIDGE_STRICT_PLUGINS=1``
    a plugin that fails to import is an error instead of a warning.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import cache

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError
from .registry import TransformRegistry, decorated_transforms

if sys.version_info >= (3, 12):
    from importlib.metadata import EntryPoint, entry_points
else:  # importlib-metadata backports the 3.12 API (dist on entry points)
    from importlib_metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "statebridge"
CORE = "statebridge (core)"


@dataclass
class PluginInfo:
    """An installed plugin: where it comes from and what it registered."""

    name: str
    distribution: str
    version: str
    module: str
    transforms: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Plugins:
    """Everything loaded: the pluggy manager, the transform registry, the writers."""

    manager: pluggy.PluginManager
    transforms: TransformRegistry
    writers: dict[str, type]
    info: list[PluginInfo]

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.manager.hook


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _selected(ep: EntryPoint, dist: str) -> bool:
    only, disabled = _names("STATEBRIDGE_LOAD_PLUGINS"), _names("STATEBRIDGE_DISABLE_PLUGINS") or set()
    names = {ep.name, dist}
    if names & disabled:
        return False
    return only is None or bool(names & only)


@cache
def load_plugins() -> Plugins:
    """Load the default plugins and every selected entry-point plugin (once per process)."""
    from . import default_plugins

    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    strict = os.environ.get("STATEBRIDGE_STRICT_PLUGINS", "") not in ("", "0")
    info: list[PluginInfo] = []
    from . import __version__

    for module in default_plugins.MODULES:
        manager.register(module, name=f"statebridge.{module.__name__.rsplit('.', 1)[-1]}")
    core = PluginInfo("statebridge", "statebridge", __version__, "statebridge.default_plugins")
    info.append(core)
    origins: dict[str, PluginInfo] = {m.__name__: core for m in default_plugins.MODULES}

    seen: set[str] = set()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if ep.name in seen or not _selected(ep, dist):
            continue
        seen.add(ep.name)
        plugin = PluginInfo(ep.name, dist, version, ep.value)
        try:
            obj = ep.load()
            manager.register(obj, name=ep.name)
        except Exception as e:  # noqa: BLE001 - any import failure of third-party code
            plugin.error = f"{type(e).__name__}: {e}"
            message = f"statebridge plugin {ep.name!r} from {dist} {version} failed to load: {plugin.error}"
            if strict:
                raise PluginError(message + " (STATEBRIDGE_STRICT_PLUGINS=1)") from e
            warnings.warn(message + "; the other plugins are loaded", RuntimeWarning, stacklevel=2)
            info.append(plugin)
            continue
        info.append(plugin)
        origins[getattr(obj, "__name__", ep.value.split(":")[0])] = plugin

    by_package = {m.split(".")[0]: p for m, p in origins.items()}

    def owner_of(obj: object) -> PluginInfo | None:
        """The plugin whose top-level package defines ``obj`` (None: defined by the user's own code)."""
        return by_package.get((getattr(obj, "__module__", "") or "").split(".")[0])

    registry = TransformRegistry()
    classes = list(decorated_transforms())
    for batch in manager.hook.statebridge_transform():
        classes.extend(batch or [])
    for cls in dict.fromkeys(classes):
        plugin = owner_of(cls)
        try:
            registry.add(cls, f"{plugin.distribution} {plugin.version}" if plugin else cls.__module__)
        except ConfigError as e:
            raise PluginError(str(e)) from None
        if plugin:
            plugin.transforms.append(cls.name)

    writers: dict[str, type] = {}
    for batch in manager.hook.statebridge_export():
        for cls in batch or []:
            writers.setdefault(cls.format, cls)
            if plugin := owner_of(cls):
                plugin.writers.append(cls.format)
    for impl in manager.hook.statebridge_analyses.get_hookimpls():
        if plugin := by_package.get(impl.plugin.__name__.split(".")[0]):
            plugin.analyses.extend(impl.function() or [])
    for obj in manager.get_plugins():
        if plugin := by_package.get(getattr(obj, "__name__", "").split(".")[0]):
            plugin.hooks.extend(c.name for c in manager.get_hookcallers(obj) or [] if c.name not in plugin.hooks)
    for plugin in info:
        plugin.hooks.sort()
        plugin.transforms.sort()
    return Plugins(manager, registry, writers, info)


def get_plugin_manager() -> Plugins:
    return load_plugins()


def registry() -> TransformRegistry:
    return load_plugins().transforms


def reset_plugins() -> None:
    """Forget loaded plugins so the next use reloads them (for tests and long-lived processes)."""
    load_plugins.cache_clear()
