"""Metadata filters, compiled once per request and evaluated per document.

Semantics, chosen so a filter never matches by accident:

- Three-valued logic, as SQL's ``WHERE``: a condition on a key that is
  missing (or null, or of a type the condition cannot compare) is
  *unknown*, and ``none_of`` (NOT) of unknown stays unknown. Only a definite
  *true* matches. So ``none_of: [env = prod]`` matches documents whose env
  is something else, never documents without an env; to include those, add
  ``any_of: [..., exists: false]``. ``exists`` is always definite.
- ``eq`` and ``in`` compare numbers numerically (``3`` equals ``3.0``) and
  never across types (the string ``"3"`` is not the number ``3``: a
  definite false). On a list-valued key they match when any element does.
- ``range`` compares numbers with numbers and strings with strings
  (lexically, so RFC 3339 UTC timestamps compare by time); a value of
  another type is unknown. On a list it matches when any element is inside.
- Malformed filters are rejected whole, with the path of the bad node:
  an empty ``all_of``/``any_of``/``none_of``, an empty ``in``, no condition,
  a bound of the wrong type, two lower (or upper) bounds, a bad key path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument
from autoecoops.memory.v1 import memory_pb2

#: A compiled filter: metadata -> True, False or None (unknown).
Predicate = Callable[[Mapping[str, Any]], bool | None]
MAX_NODES = 1024
MAX_DEPTH = 16
MAX_IN_VALUES = 1024
_MISSING = object()
Scalar = str | float | bool | None


@dataclass
class _Budget:
    nodes: int = 0


def _bad(path: str, message: str) -> InvalidArgument:
    return InvalidArgument(
        f"{path}: {message}",
        reason="MALFORMED_FILTER",
        field_violations=[FieldViolation(path, message)],
    )


def compile_filter(
    f: memory_pb2.Filter | None, path: str = "filter"
) -> Callable[[Mapping[str, Any]], bool] | None:
    """A matcher for ``f`` (None when no filter is set); INVALID_ARGUMENT if malformed."""
    if f is None or f.WhichOneof("kind") is None:
        return None
    pred = _node(f, path, 0, _Budget())
    return lambda meta: pred(meta) is True


def _node(f: memory_pb2.Filter, path: str, depth: int, budget: _Budget) -> Predicate:
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise _bad(path, f"the filter has more than {MAX_NODES} nodes")
    if depth > MAX_DEPTH:
        raise _bad(path, f"the filter nests deeper than {MAX_DEPTH}")
    kind = f.WhichOneof("kind")
    if kind is None:
        raise _bad(path, "set one of field, all_of, any_of, none_of")
    if kind == "field":
        return _condition(f.field, f"{path}.field")
    items = getattr(f, kind).filters
    sub = f"{path}.{kind}.filters"
    if not items:
        raise _bad(sub, f"{kind} needs at least one filter")
    preds = [_node(g, f"{sub}[{i}]", depth + 1, budget) for i, g in enumerate(items)]
    if kind == "all_of":
        return lambda meta: _and(p(meta) for p in preds)
    any_of: Predicate = lambda meta: _or(p(meta) for p in preds)  # noqa: E731
    if kind == "any_of":
        return any_of
    return lambda meta: _not(any_of(meta))


def _and(values: Any) -> bool | None:
    unknown = False
    for v in values:
        if v is False:
            return False
        if v is None:
            unknown = True
    return None if unknown else True


def _or(values: Any) -> bool | None:
    unknown = False
    for v in values:
        if v is True:
            return True
        if v is None:
            unknown = True
    return None if unknown else False


def _not(value: bool | None) -> bool | None:
    return None if value is None else not value


def _key(raw: str, path: str) -> tuple[str, ...]:
    parts = tuple(raw.split("."))
    if not raw or any(not p for p in parts):
        raise _bad(path, "a dotted key path with no empty segments is required, e.g. labels.env")
    return parts


def lookup(meta: Mapping[str, Any], key: tuple[str, ...]) -> Any:
    """The value at ``key`` in nested ``meta``, or the missing marker."""
    value: Any = meta
    for part in key:
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _scalar(v: struct_pb2.Value, path: str) -> Scalar:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "null_value":
        return None
    raise _bad(path, "must be a string, number, bool or null (not a list or object)")


def _same(a: Any, b: Scalar) -> bool:
    # bool is an int in Python; keep true distinct from 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def _condition(c: memory_pb2.FieldCondition, path: str) -> Predicate:
    key = _key(c.key, f"{path}.key")
    match = c.WhichOneof("match")
    if match is None:
        raise _bad(path, "set one of eq, in_values, range, exists")
    if match == "exists":
        want = c.exists
        return lambda meta: (lookup(meta, key) is not _MISSING) == want
    if match == "eq":
        values: tuple[Scalar, ...] = (_scalar(c.eq, f"{path}.eq"),)
    elif match == "in_values":
        items = c.in_values.values
        if not items:
            raise _bad(f"{path}.in_values", "needs at least one value")
        if len(items) > MAX_IN_VALUES:
            raise _bad(f"{path}.in_values", f"at most {MAX_IN_VALUES} values")
        values = tuple(_scalar(v, f"{path}.in_values[{i}]") for i, v in enumerate(items))
    else:
        return _range(c.range, key, f"{path}.range")

    def equals(meta: Mapping[str, Any]) -> bool | None:
        value = lookup(meta, key)
        if value is _MISSING:
            return None
        if value is None:
            return True if None in values else None
        elements = value if isinstance(value, list) else [value]
        return any(_same(e, v) for e in elements for v in values if v is not None)

    return equals


def _range(r: memory_pb2.Range, key: tuple[str, ...], path: str) -> Predicate:
    bounds: dict[str, Scalar] = {}
    for name in ("gt", "gte", "lt", "lte"):
        if r.HasField(name):
            bounds[name] = _scalar(getattr(r, name), f"{path}.{name}")
    if not bounds:
        raise _bad(path, "set a lower bound (gt or gte), an upper bound (lt or lte), or both")
    if "gt" in bounds and "gte" in bounds:
        raise _bad(path, "set gt or gte, not both")
    if "lt" in bounds and "lte" in bounds:
        raise _bad(path, "set lt or lte, not both")
    kinds = {_kind(v) for v in bounds.values()}
    if None in kinds or len(kinds) != 1:
        raise _bad(path, "bounds must all be numbers or all be strings")
    (kind,) = kinds
    lo_name = "gt" if "gt" in bounds else "gte" if "gte" in bounds else ""
    hi_name = "lt" if "lt" in bounds else "lte" if "lte" in bounds else ""
    lo, hi = bounds.get(lo_name), bounds.get(hi_name)

    def inside(x: Any) -> bool:
        if lo is not None and not (x > lo if lo_name == "gt" else x >= lo):  # type: ignore[operator]
            return False
        return hi is None or (x < hi if hi_name == "lt" else x <= hi)  # type: ignore[operator]

    def test(meta: Mapping[str, Any]) -> bool | None:
        value = lookup(meta, key)
        if value is _MISSING or value is None:
            return None
        comparable = [
            e for e in (value if isinstance(value, list) else [value]) if _kind(e) == kind
        ]
        if not comparable:
            return None
        return any(inside(e) for e in comparable)

    return test


def _kind(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return None
