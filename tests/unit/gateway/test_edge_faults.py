"""REST-edge defects found by fuzzing: escaped slashes in a ``**`` variable,
spent deadlines, nested fields of well-known types in the query, and every
bad line of an NDJSON client stream."""

from __future__ import annotations

import httpx
import pytest

from autoecoops.gateway.openapi import build_document
from autoecoops.gateway.rules import Binding
from tests.unit.gateway.conftest import Kitchen

pytestmark = pytest.mark.asyncio(loop_scope="module")


def violations(response: httpx.Response) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest violation of a Status body."""
    out: list[tuple[str, str]] = []
    for d in response.json()["details"]:
        if d["@type"].endswith("google.rpc.BadRequest"):
            out += [(v["field"], v["description"]) for v in d["fieldViolations"]]
    return out


async def test_a_double_star_variable_takes_escaped_slashes_as_slashes(kitchen: Kitchen) -> None:
    raw = await kitchen.http.get("/v1/files/etc/app/config.yaml")
    escaped = await kitchen.http.get("/v1/files/etc%2Fapp%2Fconfig.yaml")
    mixed = await kitchen.http.get("/v1/files/etc/app%2fconfig.yaml")
    assert raw.status_code == escaped.status_code == mixed.status_code == 200
    assert (
        raw.json()
        == escaped.json()
        == mixed.json()
        == {"path": "etc/app/config.yaml", "size": "19"}
    )
    # An empty segment is no path, encoded or not.
    for path in ("/v1/files/etc%2F%2Fapp", "/v1/files/etc%2F", "/v1/files/etc//app"):
        assert (await kitchen.http.get(path)).status_code == 404, path


async def test_the_document_describes_a_double_star_as_the_router_takes_it(
    kitchen_bindings: list[Binding],
) -> None:
    doc = build_document(kitchen_bindings)
    (param,) = doc["paths"]["/v1/files/{path}"]["get"]["parameters"][:1]
    assert param["name"] == "path"
    assert "%2F" in param["description"]
    assert param["schema"]["pattern"] == "^[^/]+(/[^/]+)*$"


@pytest.mark.parametrize("header", ["0n", "1n", "0S", "0m", "1u"])
async def test_a_spent_deadline_is_always_504(kitchen: Kitchen, header: str) -> None:
    for _ in range(20):
        r = await kitchen.http.get("/v1/kitchens/abc", headers={"Grpc-Timeout": header})
        assert r.status_code == 504, r.text
        assert r.json()["code"] == 4
    assert kitchen.servicer.calls.get("Echo", 0) == 0


async def test_x_request_timeout_zero_is_504(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/abc", headers={"X-Request-Timeout": "0"})
    assert r.status_code == 504


@pytest.mark.parametrize(
    "query",
    [
        "when.seconds=abc",
        "when.seconds=5",
        "ttl.nanos=1",
        "maybe.value=3",
        "mask.paths=name",
        "when.nope=1",
    ],
)
async def test_fields_inside_a_well_known_type_in_the_query_are_400(
    kitchen: Kitchen, query: str
) -> None:
    r = await kitchen.http.get(f"/v1/kitchens/abc?{query}")
    assert r.status_code == 400, r.text
    field = query.split(".")[0]
    assert [f for f, _ in violations(r)] == [field]
    assert kitchen.servicer.calls.get("Echo", 0) == 0


async def test_well_known_types_in_their_string_form_still_work(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/abc?when=2024-01-02T03:04:05Z&ttl=1.5s&maybe=3")
    assert r.status_code == 200, r.text
    assert r.json()["when"] == "2024-01-02T03:04:05Z"
    assert r.json()["ttl"] == "1.500s"


async def test_every_bad_line_of_a_client_stream_is_reported(kitchen: Kitchen) -> None:
    body = b'{"value": 1}\n{"value": "x"}\n{oops\n{"value": 2}\n{"value": "y"}\n[1\n'
    r = await kitchen.http.post("/v1/uploads", content=body)
    assert r.status_code == 400
    lines = sorted(int(d.split(":")[0].split()[1]) for _, d in violations(r))
    assert lines == [2, 3, 5, 6]
    assert kitchen.servicer.calls.get("Upload", 0) == 0
