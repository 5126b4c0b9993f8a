"""A config's ``metadata:`` applied to the output: fields set or deleted, explicitly, over what the source carries.

``metadata: {general.name: "x", tokenizer.chat_template: null}`` sets ``general.name`` and
deletes the ``tokenizer.chat_template`` the source would carry.  The values were checked
when the options were (:func:`statebridge.tensors.provenance.user_metadata`); what they
mean depends on the target, known here:

- a text format (safetensors ``__metadata__``; a torch file stores none) takes text only:
  a number, boolean or list is refused with one line (quote it to store it as text);
- GGUF stores typed fields: a field the source carries keeps its type (``UINT32`` stays
  ``UINT32``, an ``ARRAY`` of ``STRING`` stays one) and a value that does not fit it is
  refused; a new field gets the type ``gguf`` gives the Python value (text ``STRING``,
  boolean ``BOOL``, integer ``INT32`` or ``INT64`` when larger, number ``FLOAT32``, list an
  ``ARRAY`` of its items' type).  ``general.architecture`` cannot be deleted (llama.cpp
  reads every other key by it), and ``general.alignment`` must be a power of two;
- a deletion names a field the source carries into this target: deleting anything else
  is an error, since a misspelt name would otherwise do nothing, silently.

The edits are part of the plan's fingerprint (:mod:`statebridge.planning.fingerprint`)
and listed in the plan by :func:`findings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..tensors.provenance import MetadataValue, user_metadata

if TYPE_CHECKING:
    from gguf import GGUFValueType

    from ..readers.gguf import GGUFField
    from .base import Writer
    from .gguf import GGUFWriter

def edit_metadata(writer: Writer, metadata: Mapping[str, object] | None) -> None:
    """Set and delete ``metadata``'s fields on ``writer``, after it took in what the source carries (``carry``).

    Refuses, with one line naming the field, what the target cannot store or a deletion of
    a field the source does not carry; nothing has been written when it does.  New fields
    are added in key order, so two configs that differ only in the order of their
    ``metadata:`` (one fingerprint) write the same bytes.
    """
    from .gguf import GGUFWriter

    edits = dict(sorted(user_metadata(metadata).items()))
    if isinstance(writer, GGUFWriter):
        _edit_gguf(writer, edits)
        return
    for key, value in edits.items():
        if value is None:
            if key not in writer.metadata:
                raise _not_carried(key, writer)
            del writer.metadata[key]
        elif isinstance(value, str):
            writer.metadata[key] = value
        else:
            raise ConfigError(
                f"metadata {key!r}: {writer.format} stores metadata as text, and {value!r} is a {type(value).__name__}; "
                "quote it to store it as text"
            )


def _not_carried(key: str, writer: Writer) -> ConfigError:
    return ConfigError(f"metadata {key!r}: cannot delete it: the source carries no such field into {writer.format}")


def _edit_gguf(writer: GGUFWriter, edits: Mapping[str, MetadataValue]) -> None:
    """Deletions leave out the source's fields; sets become typed ``fields``, which win over them."""
    from .gguf import ALIGNMENT_KEY, ARCHITECTURE_KEY

    for key, value in edits.items():
        if value is None:
            if key == ARCHITECTURE_KEY:
                raise ConfigError(
                    f"metadata {key!r}: cannot delete it: llama.cpp finds every other field by the architecture; set it instead"
                )
            if key not in writer.carried and key not in writer.metadata:
                raise _not_carried(key, writer)
            writer.carried.pop(key, None)
            writer.metadata.pop(key, None)
            writer.fields.pop(key, None)
            continue
        field = gguf_field(key, value, writer.carried.get(key))
        if key == ALIGNMENT_KEY and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1)):
            raise ConfigError(f"metadata {key!r}: the alignment must be a power of two, not {value!r}")
        writer.fields[key] = field


def gguf_field(key: str, value: MetadataValue, carried: GGUFField | None) -> GGUFField:
    """``value`` as a typed GGUF field: in ``carried``'s type when the source has the field, else in gguf's for it."""
    from gguf import GGUFValueType

    from ..readers.gguf import GGUFField

    if carried is not None:
        vtype, sub_type = carried.type, carried.sub_type
    else:
        vtype = _infer(key, [value]) if not isinstance(value, list) else GGUFValueType.ARRAY
        sub_type = _infer(key, value) if isinstance(value, list) else None
    if vtype == GGUFValueType.ARRAY:
        if not isinstance(value, list):
            raise _misfit(key, value, carried, "a list")
        if sub_type is None or sub_type == GGUFValueType.ARRAY:
            raise ConfigError(f"metadata {key!r}: the source stores it as a nested array, which a config cannot set")
        return GGUFField([_fit(key, item, sub_type, carried) for item in value], vtype, sub_type)
    return GGUFField(_fit(key, value, vtype, carried), vtype)


#: the integer GGUF types and the values each holds, [low, high)
_INTEGERS: dict[str, tuple[int, int]] = {
    "UINT8": (0, 2**8), "INT8": (-(2**7), 2**7), "UINT16": (0, 2**16), "INT16": (-(2**15), 2**15),
    "UINT32": (0, 2**32), "INT32": (-(2**31), 2**31), "UINT64": (0, 2**64), "INT64": (-(2**63), 2**63),
}


def _infer(key: str, values: list[Any]) -> GGUFValueType:
    """The GGUF type of a new field's values (a list's items), as gguf's writer would choose it."""
    from gguf import GGUFValueType

    if all(isinstance(v, str) for v in values):
        return GGUFValueType.STRING
    if all(isinstance(v, bool) for v in values):
        return GGUFValueType.BOOL
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        low, high = _INTEGERS["INT32"]
        return GGUFValueType.INT32 if all(low <= v < high for v in values) else GGUFValueType.INT64
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return GGUFValueType.FLOAT32
    raise ConfigError(f"metadata {key!r}: a list mixes kinds of values ({values!r}); give items of one kind")


def _fit(key: str, value: Any, vtype: GGUFValueType, carried: GGUFField | None) -> Any:
    """``value`` if it is one of ``vtype``; a one-line error naming the field otherwise."""
    name = vtype.name
    if name == "STRING" and isinstance(value, str):
        return value
    if name == "BOOL" and isinstance(value, bool):
        return value
    if name in _INTEGERS and isinstance(value, int) and not isinstance(value, bool):
        low, high = _INTEGERS[name]
        if low <= value < high:
            return value
        raise ConfigError(f"metadata {key!r}: {value} does not fit {name} (from {low} to {high - 1})")
    if name in ("FLOAT32", "FLOAT64") and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _misfit(key, value, carried, f"a {name} value")


def _misfit(key: str, value: Any, carried: GGUFField | None, wanted: str) -> ConfigError:
    where = f"the source stores it as {carried.type.name}" if carried is not None else f"it is {wanted}"
    return ConfigError(f"metadata {key!r}: {where}, and {value!r} is a {type(value).__name__}; give {wanted}")
