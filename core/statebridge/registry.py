"""Transform names -> classes, filled by ``@register_transform`` and the ``statebridge_transform`` hook."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError, UnknownTransformError
from .patterns import closest

T = TypeVar("T", bound=type)

#: classes tagged by the decorator, in definition order; the plugin manager collects them
_decorated: list[type] = []

#: first-party transform names and the extra that installs them, for helpful errors
FIRST_PARTY_TRANSFORMS: Mapping[str, str] = {
    "lora_merge": "lora",
    "lora_layout": "lora",
    "lora_extract": "lora",
    "grow_depth": "progressive",
    "grow_width": "progressive",
    "ewc": "progressive",
    "seeddelta": "seeddelta",
}


def register_transform(name: str) -> Callable[[T], T]:
    """Give a :class:`~statebridge.Transform` subclass its config name and register it.

    Use it in a plugin's entry-point module (or any module that module imports)::

        @register_transform("scale_heads")
        class ScaleHeads(Transform):
            class Params(statebridge.Params):
                factor: float
            def plan(self, metas): ...
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"transform name {name!r} must be letters, digits and underscores")

    def decorate(cls: T) -> T:
        cls.name = name  # type: ignore[attr-defined]
        _decorated.append(cls)
        return cls

    return decorate


def decorated_transforms() -> list[type]:
    return list(_decorated)


class TransformRegistry:
    """The transforms available in this process, with the plugin that provides each."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self._owners: dict[str, str] = {}

    def add(self, cls: type, owner: str) -> None:
        name = getattr(cls, "name", "")
        if not name:
            raise ConfigError(f"plugin {owner!r} returned transform class {cls.__qualname__} without a name")
        existing = self._classes.get(name)
        if existing is not None and existing is not cls:
            raise ConfigError(
                f"transform {name!r} is registered twice: by {self._owners[name]!r} "
                f"({existing.__module__}.{existing.__qualname__}) and by {owner!r} ({cls.__module__}.{cls.__qualname__})"
            )
        self._classes[name] = cls
        self._owners[name] = owner

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownTransformError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        message = f"unknown transform {name!r}"
        hints = closest(name, list(self._classes) + list(FIRST_PARTY_TRANSFORMS))
        extra = FIRST_PARTY_TRANSFORMS.get(name)
        if extra:
            message += f"; it is provided by the {extra!r} plugin: pip install 'statebridge[{extra}]'"
        elif hints:
            described = []
            for hint in hints:
                hint_extra = FIRST_PARTY_TRANSFORMS.get(hint) if hint not in self._classes else None
                described.append(f"{hint!r} (pip install 'statebridge[{hint_extra}]')" if hint_extra else repr(hint))
            message += f"; did you mean {' or '.join(described)}?"
        return message + " (`statebridge plugins` lists the installed transforms)"

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type]]:
        return sorted(self._classes.items())

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def build(self, spec: Mapping[str, Any], where: str = "step") -> Any:
        """Instantiate ``{name: params}`` (the config form of one step)."""
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(f"{where}: a step is a mapping with exactly one transform name, e.g. {{rename: {{...}}}}; got {spec!r}")
        ((name, params),) = spec.items()
        cls = self.get(name)
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(f"{where} ({name}): parameters must be a mapping, got {params!r}")
        try:
            return cls(params or {})
        except ConfigError as e:
            raise e.within(where) from None
