"""Typed options: a frozen dataclass's fields, validated at construction, shared by passes and backends."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from graphopt.errors import OptionError

__all__ = ["Options", "validate_options", "type_name"]


@dataclass(frozen=True)
class Options:
    """Base of every configurable thing (a pass, a backend): its fields are its options.

    Construction turns lists into tuples (YAML gives lists; tuples keep the frozen dataclass
    hashable), checks each value against its field's type, then calls `check()` for rules beyond
    types. `from_options` builds one from a recipe's mapping, refusing unknown names;
    `describe_options` lists name, type, default and help for `graphopt passes` / `backends`.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "pass"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        validate_options(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        self.check()

    def check(self) -> None:
        """Validate option values beyond their types (raise OptionError naming the option)."""

    @classmethod
    def from_options(cls, options: dict | None):
        """Build from a recipe's option mapping, refusing unknown options by name."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(
                f"{cls.kind} '{cls.name}': unknown option '{unknown[0]}' (options: {', '.join(sorted(known)) or 'none'})"
            )
        return cls(**options)

    @classmethod
    def describe_options(cls) -> list[dict]:
        """name, type, default, whether required, and help of each option."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            rows.append({
                "name": f.name,
                "type": type_name(hints.get(f.name, Any)),
                "default": None if default is dataclasses.MISSING else default,
                "required": default is dataclasses.MISSING,
                "help": f.metadata.get("help", ""),
            })
        return rows


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
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
                f"'{owner}': option '{key}' must be {type_name(tp)}, got {value!r}"
            )
