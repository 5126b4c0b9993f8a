"""The plugin manager: the default plugins, entry-point plugins, and what each registered.

The core's own transforms, writers, gates, checks, analyses and commands are
plugins named in :data:`DEFAULT_PLUGINS` and registered exactly as third-party
ones are.  Each kind of registration is collected the first time it is needed,
so ``statebridge --help`` imports no transform and no torch.

Environment variables:

``STATEBRIDGE_LOAD_PLUGINS``
    comma-separated entry-point or distribution names: load only these plugins
    (empty string: load none). The default plugins always load.
``STATEBRIDGE_DISABLE_PLUGINS``
    comma-separated names to skip.
``STATEBRIDGE_STRICT_PLUGINS=1``
    a plugin that fails to load or register is an error instead of a warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any

import pluggy

from . import hookspecs
from ._version import __version__
from .errors import PluginError
from .discovery import EntryPoint, entry_points
from .registry import COMMAND_NAME, Catalog, TransformCatalog


ENTRY_POINT_GROUP = "statebridge"

#: the core's own plugins, as module names (imported by :func:`load_plugins`, never by other modules)
DEFAULT_PLUGINS = (
    "statebridge.transforms.builtin",
    "statebridge.writers.builtin",
    "statebridge.trust.builtin",
    "statebridge.commands",
)

#: the registration hooks, the catalog attribute each fills, and how ``register`` maps arguments to (name, entry)
KINDS: dict[str, tuple[str, Callable[..., tuple[str, Any]]]] = {
    "transforms": ("register_transforms", lambda cls: (getattr(cls, "name", ""), cls)),
    "writers": ("register_writers", lambda cls: (getattr(cls, "format", ""), cls)),
    "gates": ("register_gates", lambda name, gate: (name, gate)),
    "analyses": ("register_analyses", lambda name, analysis: (name, analysis)),
    "commands": ("register_commands", lambda command: (getattr(command, "name", ""), command)),
}


@dataclass
class PluginInfo:
    """An installed plugin: where it comes from, what it registered, or why it failed.

    The distribution's name and version are read from its metadata only when
    asked for (reading every plugin's METADATA would slow down ``statebridge --help``).
    """

    name: str
    module: str
    entry_point: EntryPoint | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    @cached_property
    def distribution(self) -> str:
        if self.entry_point is None:  # the core, or a plugin added in-process (Plugins.add)
            return "statebridge" if self.name == "statebridge" else self.module
        return self.entry_point.distribution

    @cached_property
    def version(self) -> str:
        if self.entry_point is None:
            return __version__ if self.name == "statebridge" else "local"
        return self.entry_point.version

    @property
    def label(self) -> str:
        """``"distribution version"``: how catalogs and fingerprints name the plugin."""
        return f"{self.distribution} {self.version}"

    def __str__(self) -> str:
        return self.label

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "distribution": self.distribution, "version": self.version, "module": self.module,
            "provides": self.provides, "hooks": self.hooks, "error": self.error,
        }


class Plugins:
    """The loaded plugins: the pluggy manager and one catalog per kind of registration."""

    def __init__(self, manager: pluggy.PluginManager, info: list[PluginInfo], strict: bool) -> None:
        self.manager, self.info, self.strict = manager, info, strict
        self._by_name = {p.name: p for p in info}

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.manager.hook

    @cached_property
    def transforms(self) -> TransformCatalog:
        return self._collect("transforms", TransformCatalog())

    @cached_property
    def writers(self) -> Catalog[type]:
        return self._collect("writers", Catalog("writer format"))

    @cached_property
    def gates(self) -> Catalog[Callable[..., Any]]:
        return self._collect("gates", Catalog("gate"))

    @cached_property
    def analyses(self) -> Catalog[Callable[..., Any]]:
        return self._collect("analyses", Catalog("analysis"))

    @cached_property
    def commands(self) -> Catalog[Any]:
        return self._collect("commands", Catalog("command", COMMAND_NAME))

    def add(self, plugin: object, name: str) -> PluginInfo:
        """Register ``plugin`` (a module or object with hook functions) in this process, as ``name``.

        For scripts and notebooks that define transforms or hooks without an
        installed distribution; the catalogs are collected again on next use.
        """
        self.manager.register(plugin, name=name)
        info = PluginInfo(name, getattr(plugin, "__name__", type(plugin).__name__))
        info.hooks = sorted(c.name for c in self.manager.get_hookcallers(plugin) or [])
        self.info.append(info)
        self._by_name[name] = info
        for kind in KINDS:
            self.__dict__.pop(kind, None)
        return info

    def providers(self) -> dict[str, str]:
        """Transform name -> the plugin (``"dist version"``) that provides it (for fingerprints)."""
        catalog = self.transforms
        return {name: str(catalog.owner(name)) for name in catalog}

    def collect_all(self) -> None:
        """Fill every catalog (for ``statebridge plugins``, which lists everything)."""
        for kind in KINDS:
            getattr(self, kind)

    def _collect(self, kind: str, catalog: Catalog[Any]) -> Catalog[Any]:
        hook_name, unpack = KINDS[kind]
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            plugin = self._by_name[impl.plugin_name]
            names = plugin.provides.setdefault(kind, [])

            def register(*args: Any, _plugin: PluginInfo = plugin, _names: list[str] = names) -> None:
                name, entry = unpack(*args)
                try:
                    catalog.add(name, entry, _plugin)
                except PluginError as e:  # a bad name or a clash: this entry is refused, the rest still register
                    self._failed(_plugin, str(e), e)
                    return
                _names.append(name)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as e:  # noqa: BLE001 - a third party's failure is reported, the others still work
                self._failed(plugin, f"{hook_name} raised {type(e).__name__}: {e}", e)
            names.sort()
        return catalog

    def _failed(self, plugin: PluginInfo, error: str, cause: BaseException) -> None:
        plugin.error = error
        message = f"statebridge plugin {plugin.name!r} from {plugin.label} failed: {error}"
        if self.strict:
            raise PluginError(message + " (STATEBRIDGE_STRICT_PLUGINS=1)") from cause
        warnings.warn(message + "; the other plugins still work", RuntimeWarning, stacklevel=3)


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _selected(ep: EntryPoint) -> bool:
    """Whether the environment selects this entry point, by its name or its distribution's."""
    only, disabled = _names("STATEBRIDGE_LOAD_PLUGINS"), _names("STATEBRIDGE_DISABLE_PLUGINS") or set()
    if only is None and not disabled:
        return True
    names = {ep.name, ep.distribution}
    if names & disabled:
        return False
    return only is None or bool(names & only)


def load_plugins() -> Plugins:
    """Load the default plugins and every selected entry-point plugin into a new manager."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    strict = os.environ.get("STATEBRIDGE_STRICT_PLUGINS", "") not in ("", "0")
    core = PluginInfo("statebridge", ", ".join(DEFAULT_PLUGINS))
    info: list[PluginInfo] = [core]
    for module_name in DEFAULT_PLUGINS:
        manager.register(importlib.import_module(module_name), name=module_name)

    plugins = Plugins(manager, info, strict)
    plugins._by_name.update(dict.fromkeys(DEFAULT_PLUGINS, core))
    seen: set[str] = set()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen or not _selected(ep):
            continue
        seen.add(ep.name)
        plugin = PluginInfo(ep.name, ep.value, ep)
        info.append(plugin)
        plugins._by_name[ep.name] = plugin
        try:
            manager.register(ep.load(), name=ep.name)
        except Exception as e:  # noqa: BLE001 - any import failure of third-party code
            plugins._failed(plugin, f"{type(e).__name__}: {e}", e)
    for name, plugin in plugins._by_name.items():
        if manager.has_plugin(name):
            callers = manager.get_hookcallers(manager.get_plugin(name)) or []
            plugin.hooks = sorted({*plugin.hooks, *(c.name for c in callers)})
    return plugins


@cache
def installed() -> Plugins:
    """The plugins of this process, loaded on first use (the API, config and CLI layers share them)."""
    return load_plugins()


def reset_plugins() -> None:
    """Forget the loaded plugins so the next use reloads them (for tests and long-lived processes)."""
    installed.cache_clear()
