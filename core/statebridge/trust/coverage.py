"""Coverage and invariants: is every key accounted for, and does the result fit its target?

Two questions, both answered from the plan alone, before any tensor byte is read:

- **coverage** (source side): the share of source tensors that some step handled
  on purpose (mapped or dropped) rather than carried along untouched.
  ``coverage: 1.0`` means no source key may pass through unnoticed.
- **target spec** (target side): an ``nn.Module``, a list of keys, or another
  checkpoint's header.  ``no_missing`` requires every spec key to be produced,
  ``no_extra`` forbids producing keys the spec lacks; shape and dtype
  differences from the spec are errors unless ``match_shapes`` /
  ``match_dtypes`` are turned off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .findings import Finding
from ..errors import ConfigError
from ..readers.memory import is_module
from ..tensors.meta import TensorMeta
from ..tensors.patterns import describe_keys
from ..transforms.base import format_validation_error

if TYPE_CHECKING:
    from ..planning.plan import Plan

Spec = Mapping[str, TensorMeta | None]


class Requirements(BaseModel):
    """``require:`` in a config (``--require`` on the command line)."""

    model_config = ConfigDict(extra="forbid")

    coverage: float | None = Field(None, ge=0, le=1, description="least share of source tensors a step must handle")
    no_missing: bool = Field(False, description="every key of the target spec must be produced")
    no_extra: bool = Field(False, description="no key outside the target spec may be produced")
    match_shapes: bool = Field(True, description="a shape differing from the target spec is an error")
    match_dtypes: bool = Field(True, description="a dtype differing from the target spec is an error")

    @classmethod
    def parse(cls, text: str) -> "Requirements":
        """``coverage=1.0,no_missing,no_extra`` (the command-line form)."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            values[name.strip()] = value.strip() if value else True
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError(f"--require {text!r}: {format_validation_error(e, '')}") from None


def target_spec(expect: Any) -> Spec:
    """Key -> metadata (or None when only names are known) from a module, key list, path or source."""
    if is_module(expect):
        return {k: TensorMeta.of(v) for k, v in expect.state_dict(keep_vars=True).items()}
    if isinstance(expect, Sequence) and not isinstance(expect, str):
        return {str(k): None for k in expect}
    from ..readers import open_source

    with open_source(expect) as spec:
        return dict(spec.metas())


def findings(plan: "Plan") -> list[Finding]:
    """The violations of ``plan.options['require']`` and of the target spec, as error findings."""
    require: Requirements = plan.options.get("require") or Requirements()
    spec: Spec | None = plan.options.get("expect")
    out: list[Finding] = []
    total = len(plan.source.metas())
    handled = len(plan.mapped) + len(plan.dropped)
    if require.coverage is not None and total and handled / total < require.coverage:
        out.append(
            Finding(
                "error",
                f"coverage {handled / total:.3f} < required {require.coverage}: {len(plan.unmapped)} source tensors "
                f"pass through untouched: {describe_keys(plan.unmapped)}",
                "coverage",
            )
        )
    if spec is None:
        if require.no_missing or require.no_extra:
            raise ConfigError("no_missing and no_extra need a target spec: expect: a checkpoint, a module or a key list")
        return out
    missing = [k for k in spec if k not in plan.outputs]
    extra = [k for k in plan.outputs if k not in spec]
    # what a did-you-mean may pair: keys made that the spec lacks, with the spec's keys nothing makes
    near = ({k: plan.outputs[k] for k in extra}, {k: spec[k] for k in missing}) if missing and extra else None
    if missing:
        level = "error" if require.no_missing else "warning"
        out.append(Finding(level, f"{len(missing)} keys of the target spec are not produced: {describe_keys(missing)}", "no_missing", near=near))
    if extra:
        level = "error" if require.no_extra else "warning"
        out.append(Finding(level, f"{len(extra)} produced keys are not in the target spec: {describe_keys(extra)}", "no_extra", near=near))
    shapes = [k for k, m in plan.outputs.items() if spec.get(k) is not None and spec[k].shape != m.shape]
    dtypes = [k for k, m in plan.outputs.items() if spec.get(k) is not None and spec[k].dtype != m.dtype]
    for keys, what, strict in ((shapes, "shape", require.match_shapes), (dtypes, "dtype", require.match_dtypes)):
        if keys:
            first = keys[0]
            out.append(
                Finding(
                    "error" if strict else "warning",
                    f"{len(keys)} tensors differ in {what} from the target spec: {describe_keys(keys)} "
                    f"(e.g. {first!r}: {plan.outputs[first]} here, {spec[first]} expected)",
                    f"match_{what}s",
                )
            )
    return out
