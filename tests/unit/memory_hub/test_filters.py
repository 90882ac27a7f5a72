"""Metadata filters: three-valued logic, typed comparisons, malformed filters."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from autoecoops.kernel.memory_hub.filters import compile_filter
from autoecoops.kernel.mesh.errors import InvalidArgument
from autoecoops.memory.v1 import memory_pb2

DOCS: dict[str, dict[str, Any]] = {
    "prod-db": {
        "env": "prod",
        "service": "db",
        "severity": 2,
        "tags": ["disk", "io"],
        "labels": {"team": "storage"},
    },
    "dev-db": {"env": "dev", "service": "db", "severity": 3.0, "tags": ["disk"]},
    "prod-web": {"env": "prod", "service": "web", "severity": "3", "when": "2026-03-01T10:00:00Z"},
    "no-env": {"service": "web", "severity": None, "when": "2026-01-15T00:00:00Z"},
    "empty": {},
}


def f(spec: dict[str, Any]) -> memory_pb2.Filter:
    return json_format.ParseDict(spec, memory_pb2.Filter())


def match(spec: dict[str, Any]) -> set[str]:
    m = compile_filter(f(spec))
    assert m is not None
    return {name for name, meta in DOCS.items() if m(meta)}


def cond(key: str, **test: Any) -> dict[str, Any]:
    return {"field": {"key": key, **test}}


def test_no_filter_is_none() -> None:
    assert compile_filter(None) is None
    assert compile_filter(memory_pb2.Filter()) is None


def test_eq_compares_numbers_numerically_and_never_across_types() -> None:
    assert match(cond("severity", eq=3)) == {"dev-db"}  # 3 == 3.0, but not "3"
    assert match(cond("severity", eq="3")) == {"prod-web"}
    assert match(cond("env", eq="prod")) == {"prod-db", "prod-web"}
    assert match(cond("severity", eq=None)) == {"no-env"}
    assert match(cond("labels.team", eq="storage")) == {"prod-db"}


def test_list_values_match_when_an_element_does() -> None:
    assert match(cond("tags", eq="io")) == {"prod-db"}
    assert match(cond("tags", inValues=["disk"])) == {"prod-db", "dev-db"}


def test_in_and_ranges() -> None:
    assert match(cond("service", inValues=["web", "cache"])) == {"prod-web", "no-env"}
    assert match(cond("severity", range={"gte": 2, "lt": 3})) == {"prod-db"}
    # Strings compare lexically, so RFC 3339 UTC times compare by time.
    assert match(cond("when", range={"gt": "2026-02-01T00:00:00Z"})) == {"prod-web"}


def test_a_missing_key_never_matches_a_negation_by_accident() -> None:
    not_prod = {"noneOf": {"filters": [cond("env", eq="prod")]}}
    assert match(not_prod) == {"dev-db"}  # not no-env, not empty
    # ...unless asked for explicitly.
    assert match({"anyOf": {"filters": [not_prod, cond("env", exists=False)]}}) == {
        "dev-db",
        "no-env",
        "empty",
    }
    # A range on a string value is unknown, so its negation does not match either.
    assert match({"noneOf": {"filters": [cond("severity", range={"gte": 3})]}}) == {"prod-db"}


def test_and_or_not_compose() -> None:
    spec = {
        "allOf": {
            "filters": [
                cond("service", eq="db"),
                {"anyOf": {"filters": [cond("env", eq="dev"), cond("tags", eq="io")]}},
                {"noneOf": {"filters": [cond("severity", eq=3)]}},
            ]
        }
    }
    assert match(spec) == {"prod-db"}
    assert match(cond("env", exists=True)) == {"prod-db", "dev-db", "prod-web"}


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"field": {"key": "env"}}, "filter.field"),
        ({"field": {"key": "", "eq": 1}}, "filter.field.key"),
        ({"field": {"key": "a..b", "eq": 1}}, "filter.field.key"),
        ({"allOf": {}}, "filter.all_of.filters"),
        ({"anyOf": {"filters": [{}]}}, "filter.any_of.filters[0]"),
        (cond("x", inValues=[]), "filter.field.in_values"),
        (cond("x", eq={"a": 1}), "filter.field.eq"),
        (cond("x", range={}), "filter.field.range"),
        (cond("x", range={"gt": 1, "gte": 2}), "filter.field.range"),
        (cond("x", range={"gt": 1, "lt": "z"}), "filter.field.range"),
        (cond("x", range={"lt": True}), "filter.field.range"),
        (
            {"noneOf": {"filters": [{"allOf": {"filters": [cond("x", inValues=[[1]])]}}]}},
            "filter.none_of.filters[0].all_of.filters[0].field.in_values[0]",
        ),
    ],
)
def test_malformed_filters_name_the_bad_node(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_filter(f(spec))
    assert info.value.reason == "MALFORMED_FILTER"
    assert info.value.field_violations[0].field == path


def test_depth_is_bounded() -> None:
    spec: dict[str, Any] = cond("x", eq=1)
    for _ in range(20):
        spec = {"allOf": {"filters": [spec]}}
    with pytest.raises(InvalidArgument):
        compile_filter(f(spec))
