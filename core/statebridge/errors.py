"""The library's error types.

Every failure a user can cause (bad file, bad config, bad plan) is raised as a
:class:`StatebridgeError` subclass whose message names the file, key, step or
plugin involved and says what to do.  The CLI prints that message alone, with
no traceback, and exits non-zero.
"""

from __future__ import annotations


class StatebridgeError(Exception):
    """Base of every error statebridge raises on purpose."""

    def within(self, where: str) -> "StatebridgeError":
        """The same error, its message prefixed by where it happened (a step, a config file).

        Built without calling ``__init__`` again, whose arguments differ between subclasses
        (``SourceError(path, message)``); the attributes are carried over.
        """
        error = type(self).__new__(type(self))
        error.__dict__.update(self.__dict__)
        error.args = (f"{where}: {self}",)
        return error


class SourceError(StatebridgeError):
    """A checkpoint file cannot be read: truncated, lying header, unsafe pickle, ..."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ConfigError(StatebridgeError):
    """A pipeline config (file or Python arguments) is invalid."""


class UnknownTransformError(ConfigError):
    """A step names a transform no installed plugin registers."""


class PlanError(StatebridgeError):
    """The pipeline cannot be planned against this source: missing key, shape mismatch, ..."""


class CollisionError(PlanError):
    """Two groups would write the same target key."""


class NotInvertibleError(PlanError):
    """A step has no exact inverse (a drop, a lossy cast, ...)."""


class ExecutionError(StatebridgeError):
    """A transform produced something other than what it planned."""


class GateRejectedError(ExecutionError):
    """A gate rejected every candidate for a target tensor."""


class PluginError(StatebridgeError):
    """A plugin failed to load (fatal only with STATEBRIDGE_STRICT_PLUGINS=1)."""
