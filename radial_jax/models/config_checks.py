"""Field types of the family configs, checked before anything compares or multiplies them.

A family config is a frozen dataclass whose annotations say what each field holds. ``check_field_types``
refuses a value of the wrong kind with the field's name, what it holds and what is allowed (``"32"`` for a
width would otherwise fail later as "'<' not supported between instances of 'str' and 'int'"), and turns
numpy scalars into the Python numbers they are (``np.int64(4)`` is an integer), so configs hash and
serialise alike. A numeric field named like a norm's epsilon (``*_eps``, ``*_epsilon``) must be > 0: a
negative one turns every normalisation into NaN. Fields of other annotations (tuples, unions of several types, nested configs) are left to
the family's own checks.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Optional, Tuple

import numpy as np

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@functools.lru_cache(maxsize=None)
def _simple_fields(cls) -> Tuple[Tuple[str, type, bool], ...]:
    """``(name, int | float | bool | str, None allowed)`` for each field annotated with one of those."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) is typing.Union and len(args) == 1
        base = args[0] if optional else hint
        if base in _NAMES:
            out.append((field.name, base, optional))
    return tuple(out)


def _coerced(value, kind: type) -> Optional[object]:
    """``value`` as a Python ``kind``, or None when it is not one (bools are not numbers here)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value) if kind is bool else None
    if kind is int and isinstance(value, (int, np.integer)):
        return int(value)
    if kind is float and isinstance(value, (int, float, np.integer, np.floating)):
        return value if isinstance(value, (int, float)) else float(value)
    if kind is str and isinstance(value, str):
        return value
    return None


def check_field_types(config) -> None:
    """Refuse a field of ``config`` that is not of its annotated type; numpy scalars become Python numbers."""
    cls = type(config)
    for name, kind, optional in _simple_fields(cls):
        value = getattr(config, name)
        if value is None and optional:
            continue
        coerced = _coerced(value, kind)
        if coerced is None:
            allowed = _NAMES[kind] + (" or null" if optional else "")
            raise ValueError(f"{cls.__name__}.{name} must be {allowed}, got {value!r} ({type(value).__name__})")
        if name.endswith(("_eps", "_epsilon")) and not coerced > 0:
            raise ValueError(f"{cls.__name__}.{name} must be > 0 (a norm's epsilon), got {value!r}")
        if coerced is not value:
            object.__setattr__(config, name, coerced)  # frozen dataclass: as its own __post_init__ does
