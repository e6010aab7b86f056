"""Pass contract: options as a frozen dataclass, run_fx / run_onnx entry points, a name registry."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from graphopt.errors import OptionError, UnsupportedGraphError
from graphopt.ir import Form, Model

__all__ = ["Pass", "PassResult", "PassContext", "register_pass", "PASSES", "validate_options"]

PASSES: dict[str, type["Pass"]] = {}


@dataclass
class PassResult:
    """What a pass returns: the model (possibly the same object), whether it changed, and stats."""

    model: Model
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What the pass manager hands every pass: calibration feeds and a progress switch.

    calib: feeds (input name -> numpy array) for calibration; None when the user gave none.
    progress: whether long work may show a progress bar.
    """

    calib: list[dict[str, np.ndarray]] | None = None
    progress: bool = True

    def require_calib(self, who: str) -> list[dict[str, np.ndarray]]:
        if not self.calib:
            raise OptionError(
                f"{who} needs calibration data: pass calib=[...] to Pipeline.run, or add a "
                "'calibration:' section to the recipe"
            )
        return self.calib


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass findable by its recipe key."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"two passes named {cls.name!r}: {PASSES[cls.name].__name__} and {cls.__name__}")
    PASSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses whose fields are their options.

    A subclass sets `name` (its recipe key), implements `run_fx` and/or `run_onnx`, and may
    override `check()` to validate option values (raise OptionError naming the option).
    `mutates_input` declares whether the pass edits the model it receives in place; the pass
    manager copies the model first when it does and the caller still needs the input.
    Weight arrays are shared between copies (see `Model.copy`): replace them, never write into them.
    """

    name: ClassVar[str] = ""
    mutates_input: ClassVar[bool] = True

    def __post_init__(self):
        for f in dataclasses.fields(self):  # YAML gives lists; tuple options keep the frozen dataclass hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        validate_options(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        self.check()

    def check(self) -> None:
        """Validate option values beyond their types."""

    def run_fx(self, model: Model, ctx: PassContext) -> PassResult:
        raise UnsupportedGraphError(f"pass '{self.name}' has no FX form")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        raise UnsupportedGraphError(f"pass '{self.name}' has no ONNX form")

    @classmethod
    def forms(cls) -> tuple[Form, ...]:
        """The IR forms this pass implements, in order of preference."""
        found = []
        if cls.run_fx is not Pass.run_fx:
            found.append("fx")
        if cls.run_onnx is not Pass.run_onnx:
            found.append("onnx")
        return tuple(found)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if model.form not in self.forms():
            raise UnsupportedGraphError(
                f"pass '{self.name}' runs on {', '.join(self.forms()).upper()} only, got {model.form.upper()}"
            )
        if model.form == "fx":
            return self.run_fx(model, ctx)
        return self.run_onnx(model, ctx)

    @classmethod
    def from_options(cls, options: dict | None) -> "Pass":
        """Build from a recipe's option mapping, refusing unknown options by name."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(
                f"pass '{cls.name}': unknown option '{unknown[0]}' (options: {', '.join(sorted(known)) or 'none'})"
            )
        return cls(**options)

    @classmethod
    def describe_options(cls) -> list[dict]:
        """name, type and default of each option, for `graphopt passes` and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            rows.append({
                "name": f.name,
                "type": _type_name(hints.get(f.name, Any)),
                "default": None if default is dataclasses.MISSING else default,
                "help": f.metadata.get("help", ""),
            })
        return rows


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is Ellipsis:
        return "..."
    return getattr(tp, "__name__", str(tp))


def _matches(value, tp) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp)


def validate_options(cls: type, values: dict) -> None:
    """Check each value against its dataclass field's type; the error names the option."""
    hints = typing.get_type_hints(cls)
    owner = getattr(cls, "name", "") or cls.__name__
    for key, value in values.items():
        tp = hints.get(key, Any)
        if not _matches(value, tp):
            raise OptionError(
                f"'{owner}': option '{key}' must be {_type_name(tp)}, got {value!r}"
            )
