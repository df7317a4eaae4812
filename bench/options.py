"""One declaration per option: a typed dataclass field is its CLI flag, its `--set` key, its preset key and its
place in the record.

Standard library only (dataclasses, typing, argparse): the tables are small, and a config library (OmegaConf,
tyro) would add a second way to spell the same values. A field's type decides how a value is read, everywhere:

    bool      true/false/1/0 (any case), nothing else        int, float   Python's int() / float(); an int
    str       as typed                                                    is accepted where a float is declared
    X | None  "none" or "null" for None, else as X            tuple/list   "8,5,5" or "[8, 5, 5]", items typed
    Literal   one of the listed strings                       dict         a literal "{'ch': 64}" (nested
                                                                           tables check their own keys)

`option(default, help, ...)` declares a field with its help text, an optional lower bound and whether it gets a
command-line flag. `build(cls, values, what)` makes an instance from a mapping (a preset, a record, --set
values), refusing unknown keys and ill-typed values with one UserError that names the valid ones.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from typing import Any, Literal

from bench import UserError

NONE_WORDS = ("none", "null")
TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: bool | str = True,
           minimum: float | None = None, above: float | None = None, factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text; `flag`: True (a flag named after the field), a flag name, or False;
    `minimum` / `above`: the value must be >= minimum / > above (items of a tuple too)."""
    metadata = {"help": help, "flag": flag, "minimum": minimum, "above": above}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field, named_only: bool = False) -> str | None:
    """The field's flag; with named_only, only a flag spelled out in its declaration (nested tables' fields)."""
    flag = f.metadata.get("flag", False)
    if flag is True and not named_only:
        return "--" + f.name.replace("_", "-")
    return flag if isinstance(flag, str) else None


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --- reading one value --------------------------------------------------------------------------------------------

def _split(tp) -> tuple[Any, tuple]:
    origin = typing.get_origin(tp)
    return origin, typing.get_args(tp)


def _optional(tp) -> Any | None:
    """X for X | None, else None."""
    origin, args = _split(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return None


def describe_type(tp) -> str:
    inner = _optional(tp)
    if inner is not None:
        return f"{describe_type(inner)} or none"
    origin, args = _split(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (tuple, list):
        noun = NOUNS.get(_item_type(tp, 0), "value")
        count = f"{len(args)} " if origin is tuple and args and args[-1] is not Ellipsis else ""
        return f"{count}comma-separated {noun}s"
    return {bool: "true or false", dict: "a {...} table", **{k: f"a{'n' * (v[0] in 'aeiou')} {v}" for k, v in NOUNS.items()}}.get(
        tp, getattr(tp, "__name__", str(tp)))


NOUNS = {int: "integer", float: "number", str: "word"}


def parse_text(tp, text: str, name: str) -> Any:
    """A value of type `tp` from command-line text."""
    if tp is Any:
        return _literal(text)
    inner = _optional(tp)
    if inner is not None:
        return None if text.strip().lower() in NONE_WORDS else parse_text(inner, text, name)
    origin, args = _split(tp)
    if origin in (tuple, list):
        stripped = text.strip()
        items = _literal(stripped) if stripped[:1] in "[(" else [s for s in stripped.split(",") if s.strip()]
        if not isinstance(items, (list, tuple)):
            raise _bad(name, text, tp)
        return coerce(tp, [parse_text(_item_type(tp, i), s, name) if isinstance(s, str) else s
                           for i, s in enumerate(items)], name)
    if origin is Literal:
        for choice in args:
            if str(choice) == text.strip():
                return choice
        raise _bad(name, text, tp)
    if tp is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise _bad(name, text, tp)
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise _bad(name, text, tp) from None
    if tp is dict:
        value = _literal(text)
        if not isinstance(value, dict):
            raise _bad(name, text, tp)
        return value
    return coerce(tp, text, name)


def coerce(tp, value: Any, name: str) -> Any:
    """`value` (from TOML, JSON or Python) checked against `tp`; ints become floats where floats are declared,
    lists become tuples where tuples are."""
    if tp is Any:
        return value
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else coerce(inner, value, name)
    origin, args = _split(tp)
    if origin is Literal:
        if value not in args:
            raise _bad(name, value, tp)
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _bad(name, value, tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise _bad(name, value, tp)
        items = [coerce(_item_type(tp, i), v, name) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, value, tp)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, value, tp)
        return value
    if tp in (bool, str, dict):
        if not isinstance(value, tp):
            raise _bad(name, value, tp)
        return value
    return value


def _item_type(tp, index: int):
    origin, args = _split(tp)
    if not args:
        return Any
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        return args[0]
    return args[index] if index < len(args) else Any


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as mlp-tanh


def _bad(name: str, value: Any, tp) -> UserError:
    return UserError(f"{name} must be {describe_type(tp)}, got {value!r}")


def check_bounds(f: dataclasses.Field, value: Any, name: str) -> None:
    minimum, above = f.metadata.get("minimum"), f.metadata.get("above")
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if minimum is not None and v < minimum:
            raise UserError(f"{name} must be at least {minimum:g}, got {value!r}")
        if above is not None and not v > above:
            raise UserError(f"{name} must be greater than {above:g}, got {value!r}")


# --- whole tables -------------------------------------------------------------------------------------------------

def check_keys(keys, valid, what: str) -> None:
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        raise UserError(f"unknown {what} {', '.join(unknown)}; valid: {', '.join(sorted(valid)) or '(none)'}")


def typed_values(cls, values: dict, what: str, prefix: str = "") -> dict:
    """values, each checked and coerced to its field's type and bounds (unknown keys refused)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, fields, what)
    types_ = field_types(cls)
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}" if prefix else (flag_name(fields[key]) or key)  # RunSpec's fields by their flag
        out[key] = coerce(types_[key], value, name)
        check_bounds(fields[key], out[key], name)
    return out


def build(cls, values: dict, what: str, prefix: str = ""):
    """An instance of the dataclass `cls` from a mapping, every value typed and bounded."""
    return cls(**typed_values(cls, values, what, prefix))


def check_instance(obj, prefix: str = "") -> None:
    """Every field of a dataclass instance against its declared type and bounds (for values set in Python)."""
    typed_values(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, "setting", prefix)


def add_flags(parser: argparse._ActionsContainer, cls, dest_prefix: str = "", named_only: bool = False) -> None:
    """A flag for every field of `cls` that declares one; values stay text (parse_text reads them later), and
    a flag not given is absent from the namespace."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        name = flag_name(f, named_only)
        if name is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "") + ("" if default is None else f" (default {default})")
        dest = dest_prefix + f.name
        if types_[f.name] is bool:
            parser.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(name, dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{help_text}; {describe_type(types_[f.name])}")


def flag_values(args: argparse.Namespace, cls, dest_prefix: str = "") -> dict[str, Any]:
    """The flags of `cls` given on the command line, typed: {field name: value}."""
    types_ = field_types(cls)
    out = {}
    for f in dataclasses.fields(cls):
        dest = dest_prefix + f.name
        if not hasattr(args, dest):
            continue
        raw = getattr(args, dest)
        out[f.name] = raw if isinstance(raw, bool) else parse_text(types_[f.name], raw, flag_name(f))
    return out
