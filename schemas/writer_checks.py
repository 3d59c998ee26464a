"""The checks fastavro's writer leaves out, compiled per schema: a value that passes them and that the
writer accepts fits its schema.

Validating every value with ``fastavro.validation.validate`` before writing it was the largest part of a
worker's per-event cost (16 µs of an ImageResult's 46). The writer itself refuses most misfits (wrong
types, missing fields, unions no branch takes: it chooses a union's branch by validating, unknown enum
symbols, fixed of the wrong size), but outside unions it silently writes a float or a bool given for an
int or a long (1.5 becomes 1), an int past the 32- or 64-bit range, 1 for a boolean, True for a double,
any iterable for an array, a list for a map and a number for a timestamp. Those are checked here.

The checks may be stricter than validation (a tuple for an array, a numpy integer), never looser: a value
they refuse is validated in full before anything is decided (:meth:`SingleObjectSerde.encode`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

Check = Callable[[Any], bool]

_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_PLAIN = ("string", "bytes", "null", "enum", "fixed")  # the writer refuses what does not fit these


def _never(_value: Any) -> bool:
    return False


def _scalar(kind: str) -> Check | None:
    if kind in _INT_RANGE:
        low, high = _INT_RANGE[kind]
        return lambda value: type(value) is int and low <= value <= high
    if kind == "boolean":
        return lambda value: type(value) is bool
    if kind in ("float", "double"):
        return lambda value: type(value) is float or type(value) is int
    return None if kind in _PLAIN else _never  # a named type or anything unforeseen: validate in full


def compile_check(schema: Any) -> Check | None:
    """A function telling whether a value passes the checks the writer leaves out of ``schema`` (a parsed
    schema), or None when the writer checks everything of this schema itself."""
    if isinstance(schema, list):
        return None  # a union: the writer picks the branch by validating the value
    if isinstance(schema, str):
        return _scalar(schema)
    kind = schema.get("type")
    if isinstance(kind, (dict, list)):
        return compile_check(kind)
    logical = schema.get("logicalType")
    if logical in ("timestamp-micros", "timestamp-millis"):
        return lambda value: isinstance(value, datetime)
    if logical:
        return _never
    if kind == "record":
        fields = [(field["name"], check) for field in schema["fields"]
                  if (check := compile_check(field["type"])) is not None]
        if not fields:
            return None
        return lambda value: all(check(value[name]) for name, check in fields)
    if kind == "array":
        items = compile_check(schema["items"])
        if items is None:
            return lambda value: type(value) is list
        return lambda value: type(value) is list and all(items(item) for item in value)
    if kind == "map":
        values = compile_check(schema["values"])
        return lambda value: (type(value) is dict and all(type(key) is str for key in value)
                              and (values is None or all(values(item) for item in value.values())))
    return _scalar(kind)
