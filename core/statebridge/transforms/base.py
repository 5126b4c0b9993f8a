"""What a transform is: a small class that declares its groups before it touches data.

A transform's :meth:`~Transform.plan` receives the metadata of the state as it
stands at that step (names, shapes, dtypes; no data) and returns
:class:`Group` objects: which keys each group reads, which keys it writes with
their shapes and dtypes, and the function that computes them.  Keys no group
reads pass through the step unchanged; nothing is ever dropped implicitly.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError, NotInvertibleError
from ..tensors.meta import TensorMeta

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]
Compute = Callable[[Tensors], Tensors]


class Piece(NamedTuple):
    """``length`` bytes of tensor ``key``'s row-major bytes, from byte ``offset``.

    A named tuple, not a dataclass: plans of 200,000 tensors make one or more per tensor.
    """

    key: str
    offset: int
    length: int


#: a tensor's bytes as byte ranges of other tensors, laid end to end
Pieces = tuple[Piece, ...]

#: the key of a :class:`Piece` made of zero bytes rather than of a tensor's bytes (:meth:`Group.zeros`)
ZEROS = "\x00zeros"


def whole(key: str, meta: TensorMeta) -> Pieces:
    """All of tensor ``key``'s bytes."""
    return (_new_tuple(Piece, (key, 0, meta.nbytes)),)


#: builds a named tuple (a Piece, a Carry) from a tuple without its Python-level ``__new__`` (a third of the cost)
_new_tuple = tuple.__new__


def cut(pieces: Pieces, offset: int, length: int) -> Pieces:
    """The byte range ``[offset, offset + length)`` of the bytes ``pieces`` lay end to end."""
    out, position = [], 0
    for piece in pieces:
        start, end = max(offset, position), min(offset + length, position + piece.length)
        if start < end:
            out.append(Piece(piece.key, piece.offset + start - position, end - start))
        position += piece.length
    return tuple(out)


@dataclass(slots=True, eq=False)
class Group:
    """A unit of work: ``inputs`` -> ``outputs`` (with metadata), computed by ``compute``.

    ``pieces`` says, for a group whose every output is its inputs' bytes laid
    end to end (a rename; a concatenation, split or stack along the first
    dimension; a reshape), which byte ranges of which inputs make each output:
    writers then copy those bytes from the source file without decoding them.
    ``ops`` names what was done, for lineage and reports.  ``effort`` says how
    heavy the computing is, in passes over the group's bytes (None: one pass per
    op, right for casts, concatenations and the like); a transform that does far
    more per byte (a matmul, an SVD) says so, and torchrun ranks share the work
    by it.

    Treat a group as immutable (``dataclasses.replace`` makes a changed copy): it is
    not a frozen dataclass only because those are several times slower to build, and
    a plan of 200,000 tensors builds two groups per tensor.
    """

    inputs: tuple[str, ...]
    outputs: Mapping[str, TensorMeta]
    compute: Compute
    ops: tuple[str, ...] = ()
    pieces: Mapping[str, Pieces] | None = None
    effort: float | None = None

    @property
    def passes(self) -> float:
        """The computing effort in passes over the group's bytes (see ``effort``)."""
        return self.effort if self.effort is not None else max(1, len(self.ops))

    @classmethod
    def rename(cls, source: str, target: str, meta: TensorMeta, op: str = "rename") -> "Group":
        """A group that carries one tensor to a new name, bytes unchanged."""
        if source == target:
            ops: tuple[str, ...] = ()
        else:
            ops = _ONE_OP.get(op) or _ONE_OP.setdefault(op, (op,))
        # positional, and tuples built without the named tuples' Python-level __new__: a plan
        # of 200,000 renames builds one of these per tensor
        return cls((source,), {target: meta}, _new_tuple(Carry, (source, target)), ops, WholeOf(target, source, meta.nbytes))

    @classmethod
    def zeros(cls, target: str, meta: TensorMeta, op: str) -> "Group":
        """A group of no input whose output is all zero: written as zero bytes, without torch, where it can be.

        Its ``pieces`` are zero bytes (:data:`ZEROS`), which writers write without computing
        a tensor; a later step that reads the tensor gets it from ``compute`` (``torch.zeros``).
        """

        def compute(_: Tensors) -> Tensors:
            import torch

            return {target: torch.zeros(meta.shape, dtype=meta.dtype.torch)}

        return cls(inputs=(), outputs={target: meta}, compute=compute, ops=(op,),
                   pieces={target: (Piece(ZEROS, 0, meta.nbytes),)})

    @classmethod
    def map_one(
        cls,
        source: str,
        target: str,
        meta: TensorMeta,
        fn: Callable[[torch.Tensor], torch.Tensor],
        op: str,
        effort: float | None = None,
    ) -> "Group":
        """A group that computes one tensor from one tensor."""
        return cls(
            inputs=(source,), outputs={target: meta}, compute=lambda t: {target: fn(t[source])}, ops=(op,), effort=effort
        )


class Carry(NamedTuple):
    """The compute of a group that hands one tensor on under another name, unchanged.

    A small tuple rather than a lambda: it is smaller and quicker to build (plans of
    200,000 renames hold one per tensor), and composition can tell that the group
    changes no value.
    """

    source: str
    target: str

    def __call__(self, tensors: Tensors) -> Tensors:
        return {self.target: tensors[self.source]}


class WholeOf(Mapping[str, Pieces]):
    """The pieces of a rename: output ``target`` is all ``nbytes`` of tensor ``source``.

    A read-only mapping like any group's ``pieces``, a fifth of the size of the dict, the
    tuple and the :class:`Piece` it stands for (which it builds when asked): a plan of
    200,000 renames holds one per tensor.
    """

    __slots__ = ("target", "source", "nbytes")

    def __init__(self, target: str, source: str, nbytes: int) -> None:
        self.target, self.source, self.nbytes = target, source, nbytes

    def __getitem__(self, key: str) -> Pieces:
        if key != self.target:
            raise KeyError(key)
        return (_new_tuple(Piece, (self.source, 0, self.nbytes)),)

    def get(self, key: str, default: Any = None) -> Any:  # the mixin's goes through an exception
        return self[key] if key == self.target else default

    def __contains__(self, key: object) -> bool:
        return key == self.target

    def __iter__(self) -> Iterator[str]:
        yield self.target

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"{{{self.target!r}: {self[self.target]!r}}}"


#: ``(op,)`` for the ops groups name most, one tuple shared by every group
_ONE_OP: dict[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class Candidates:
    """Alternatives for one output tensor, best first; a group's compute may return this instead of a tensor.

    The executor writes the first alternative that no gate rejects; if every one
    is rejected the run fails before anything is committed.
    """

    options: Sequence[torch.Tensor]
    labels: Sequence[str] = ()

    def label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"candidate {i}"


#: marks a params field holding a file path; config files resolve it against their own folder
PATH_FIELD = "statebridge:path"


def usable_path(value: str) -> str:
    """A path the operating system can be asked about (no file system accepts a NUL byte)."""
    if "\0" in value:
        raise ValueError(f"a path cannot contain a NUL byte: {value!r}")
    return value


#: a file path parameter: relative ones in config files are resolved against the config's folder,
#: however the field is annotated (``PathParam | None``, ``list[PathParam]``, ...)
PathParam = Annotated[str, PATH_FIELD, AfterValidator(usable_path)]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Params(BaseModel):
    """Base of transform parameter models: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


CONFIG = "config.json"


class Companions:
    """The JSON companion files of a source folder as a step sees them when it declares edits.

    ``read(name)`` parses a file only when some step asks for it (a tokenizer.json of
    megabytes is never read for nothing) and gives it with the edits of the earlier steps
    applied; ``left`` lists the folder's entries a run does not carry (``"training/": "a folder"``).
    """

    def __init__(self, read: Callable[[str], Mapping[str, Any] | None], left: Mapping[str, str] | None = None,
                 edits: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._read, self.left, self._edits = read, dict(left or {}), {k: dict(v) for k, v in (edits or {}).items()}

    @classmethod
    def of(cls, documents: Mapping[str, Mapping[str, Any]], left: Mapping[str, str] | None = None) -> "Companions":
        """A view of documents already in memory (a file not among them is absent)."""
        return cls(documents.get, left)

    def read(self, name: str) -> dict[str, Any] | None:
        """The JSON object ``name`` holds, as the earlier steps left it; None when the folder has no such file."""
        document = self._read(name)
        return None if document is None else {**document, **self._edits.get(name, {})}

    def edited(self, edits: Mapping[str, Mapping[str, Any]]) -> "Companions":
        """This view with ``edits`` (file -> key -> value) applied on top: what the next step sees."""
        merged = {name: {**self._edits.get(name, {}), **made} for name, made in {**self._edits, **edits}.items()}
        return Companions(self._read, self.left, merged)


class Transform(ABC):
    """Base class of every transform, built in or from a plugin.

    Subclasses set ``name`` (the config name; namespace a plugin's names, e.g.
    ``myplugin.transpose``) and ``Params`` (a pydantic model), implement
    :meth:`plan`, and are registered by a ``register_transforms`` hook.  Build
    one with keyword arguments (``Rename(pattern="a.*", to="b.*")``) or a params
    mapping (``Rename({"pattern": ...})``).
    """

    #: the config name (``steps: [{name: params}]``)
    name: ClassVar[str] = ""
    #: bump when the transform's output for the same params changes (goes into fingerprints)
    version: ClassVar[str] = "1"
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        if isinstance(params, self.Params):
            self.params = params
            return
        values = {**(dict(params) if params else {}), **kwargs}
        try:
            self.params = self.Params.model_validate(values)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, self.name or type(self).__name__)) from None

    @classmethod
    def from_config(cls, params: Mapping[str, Any], transforms: Any) -> "Transform":
        """Build from config form; nested config-form steps are built from the catalog ``transforms``."""
        try:
            return cls(cls.Params.model_validate(dict(params), context={"transforms": transforms, "step": cls.name}))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, cls.name or cls.__name__)) from None

    @abstractmethod
    def plan(self, metas: Mapping[str, TensorMeta]) -> list[Group]:
        """Groups this step performs on a state with these tensors. Reads no data."""

    def config_edits(self, metas: Mapping[str, TensorMeta], config: Mapping[str, Any]) -> dict[str, Any]:
        """The edits this step makes to a model folder's ``config.json``: top-level key -> new value.

        Part of the transform contract, like :meth:`plan`: ``metas`` is the state this
        step sees (headers only) and ``config`` is config.json as the earlier steps
        left it.  A step that changes what the config describes (the dtype, the
        number of layers and every per-layer list, the widths, the vocabulary)
        returns the new values, a nested object given whole.  The plan shows the
        edits, they go into the fingerprint and a run into a folder target writes
        config.json with them, in the same atomic commit as the tensors.  The
        default is no edits.  Must not read tensor data.
        """
        return {}

    def companion_edits(self, metas: Mapping[str, TensorMeta], companions: Companions) -> dict[str, dict[str, Any]]:
        """The edits this step makes to the source folder's JSON companion files: file name -> top-level key -> new value.

        The general form of :meth:`config_edits`, for files a plugin owns (a ``.tprog``'s
        ``progressive.json`` records each growth): ``companions.read(name)`` gives a JSON
        companion as the earlier steps left it, or None when the folder has none, so a step
        asks only for the files it edits and no other is parsed.  The edits are shown in the
        plan, go into the fingerprint and are written in the run's atomic commit, as
        config.json's are.  The default is :meth:`config_edits` applied to config.json;
        override this (calling ``super()``) to edit other files too.  Must not read tensor data.
        """
        config = companions.read(CONFIG)
        edits = self.config_edits(metas, config) if config is not None else {}
        return {CONFIG: edits} if edits else {}

    def walk(self) -> Iterator["Transform"]:
        """This step and, for a step made of steps (sequential, parallel, scope), every step inside it, in order.

        What a ``validate_plan`` hook looks through to find its own transform wherever a config nested it.
        """
        yield self
        for step in getattr(self, "steps", None) or ():
            yield from step.walk()

    def inverse(self, metas: Mapping[str, TensorMeta]) -> "Transform":
        """A transform undoing this one on a state with these (pre-step) tensors."""
        raise NotInvertibleError(f"{self.name!r} has no exact inverse")

    def spec(self) -> dict[str, Any]:
        """This step as config: ``{name: params}``; the basis of fingerprints."""
        return {self.name: self.params.model_dump(mode="json", exclude_defaults=False)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


def format_validation_error(error: ValidationError, where: str, most: int = 5) -> str:
    """The problems, each naming the field, on one line: ``rename.pattern: Field required; ...``.

    Only pydantic's message is kept: no "Value error, " prefix, no documentation URL, no line
    breaks; past ``most`` problems (a list of 200 wrong items) the rest are counted, not listed.
    """
    problems = error.errors()
    lines = []
    for problem in problems[:most]:
        loc = ".".join(str(p) for p in problem["loc"])
        message = _URL.sub("", problem["msg"]).removeprefix("Value error, ")
        field = ".".join(part for part in (where, loc) if part)
        lines.append(f"{field + ': ' if field else ''}{' '.join(message.split())}")
    if len(problems) > most:
        lines.append(f"and {len(problems) - most} more problems")
    return "; ".join(lines)


#: pydantic's pointers to its documentation, and the wording that introduces them
_URL = re.compile(r"\s*(For further information visit\s*)?https?://\S+")
