"""What plugins registered, by name: one :class:`Catalog` per kind (transforms, writers, gates, ...).

The plugin manager (:mod:`statebridge.plugins`) fills catalogs through the
``register_*`` hooks; code below the API receives the catalog it needs as an
argument.  A catalog knows which plugin gave each entry, so a clash names both
plugins and an unknown name gets a "did you mean" hint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from .errors import ConfigError, PluginError, UnknownTransformError
from .tensors.patterns import closest

T = TypeVar("T")

#: names plugins may register: identifiers, optionally namespaced with dots (``myplugin.transpose``)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
#: command names: words joined by hyphens or underscores (``statebridge scale-factors``)
COMMAND_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")

#: first-party transform names and the extra that installs them, for helpful errors
FIRST_PARTY_TRANSFORMS: Mapping[str, str] = {
    "lora_merge": "lora",
    "lora_layout": "lora",
    "lora_extract": "lora",
    "grow_depth": "progressive",
    "grow_width": "progressive",
    "seeddelta": "seeddelta",
    "permute_rows": "analysis",
}


class Catalog(Generic[T]):
    """Named entries of one kind, each with the plugin that registered it (its ``str`` is ``"dist version"``)."""

    def __init__(self, kind: str, names: re.Pattern[str] = NAME) -> None:
        self.kind, self._names = kind, names
        self._entries: dict[str, T] = {}
        self._owners: dict[str, object] = {}

    def add(self, name: str, entry: T, owner: object) -> None:
        """Register ``entry`` as ``name``; a name taken by another entry is an error naming both plugins."""
        if not isinstance(name, str) or not self._names.match(name):
            rule = "letters, digits, hyphens and underscores" if self._names is COMMAND_NAME else (
                "letters, digits and underscores, optionally namespaced with dots (myplugin.transpose)"
            )
            raise PluginError(f"{owner} registered the {self.kind} name {name!r}: names are {rule}")
        existing = self._entries.get(name)
        if existing is not None and existing is not entry:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {self._owners[name]} ({_describe(existing)}) "
                f"and by {owner} ({_describe(entry)}); the first is kept"
            )
        self._entries[name] = entry
        self._owners[name] = owner

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        """The message for a name nobody registered, with the closest known names."""
        hints = closest(name, list(self._entries))
        message = f"unknown {self.kind} {name!r}"
        if hints:
            message += f"; did you mean {' or '.join(map(repr, hints))}?"
        return message + f" (installed: {', '.join(self.names()) or 'none'})"

    def owner(self, name: str) -> object:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


class TransformCatalog(Catalog[type]):
    """Transform classes by config name; builds steps from their config form ``{name: params}``."""

    def __init__(self) -> None:
        super().__init__("transform")

    def unknown(self, name: str) -> str:
        extra = FIRST_PARTY_TRANSFORMS.get(name)
        if extra:
            return (
                f"unknown transform {name!r}; it is provided by the {extra!r} plugin: "
                f"pip install 'statebridge[{extra}]' (`statebridge plugins` lists the installed transforms)"
            )
        described = []
        for hint in closest(name, self.names() + list(FIRST_PARTY_TRANSFORMS)):
            hint_extra = FIRST_PARTY_TRANSFORMS.get(hint) if hint not in self else None
            described.append(f"{hint!r} (pip install 'statebridge[{hint_extra}]')" if hint_extra else repr(hint))
        hint_text = f"; did you mean {' or '.join(described)}?" if described else ""
        return f"unknown transform {name!r}{hint_text} (`statebridge plugins` lists the installed transforms)"

    def get(self, name: str) -> type:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownTransformError(self.unknown(name)) from None

    def build(self, spec: Any, where: str = "step") -> Any:
        """Instantiate ``{name: params}`` (the config form of one step); nested steps use this catalog too."""
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(f"{where}: a step is a mapping with exactly one transform name, e.g. {{rename: {{...}}}}; got {spec!r}")
        ((name, params),) = spec.items()
        try:
            cls = self.get(name)
        except UnknownTransformError as e:
            raise e.within(where) from None
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(f"{where} ({name}): parameters must be a mapping, got {params!r}")
        try:
            return cls.from_config(params or {}, self)  # nested steps are built with this catalog too
        except ConfigError as e:
            raise e.within(where) from None


def _describe(entry: object) -> str:
    module = getattr(entry, "__module__", None)
    qualname = getattr(entry, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else type(entry).__name__
