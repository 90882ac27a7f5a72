"""HTTP/JSON -> gRPC -> JSON through a running gateway and the KitchenService backend:
path templates, query parameters, bodies, the JSON mapping, headers and streams."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest

from autoecoops.gateway.settings import GatewaySettings
from tests.unit.gateway.conftest import Kitchen, raw_request

pytestmark = pytest.mark.asyncio(loop_scope="module")


def violations(response: httpx.Response) -> dict[str, str]:
    """field -> description of the BadRequest detail of a Status body."""
    body = response.json()
    for d in body["details"]:
        if d["@type"].endswith("google.rpc.BadRequest"):
            return {v["field"]: v["description"] for v in d["fieldViolations"]}
    raise AssertionError(f"no BadRequest in {body}")


def reason(response: httpx.Response) -> str:
    """The ErrorInfo reason of a Status body."""
    for d in response.json()["details"]:
        if d["@type"].endswith("google.rpc.ErrorInfo"):
            return str(d["reason"])
    raise AssertionError("no ErrorInfo")


# -- path templates -----------------------------------------------------------


async def test_nested_path_variable_sets_the_nested_field(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/abc")
    assert r.status_code == 200
    assert r.json()["inner"] == {"id": "abc", "count": 0}


async def test_multi_segment_variable_binds_the_whole_name(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/rooms/s1/things/t1")
    assert r.status_code == 200
    assert r.json() == {"name": "rooms/s1/things/t1"}


async def test_a_path_that_does_not_fit_the_pattern_is_404(kitchen: Kitchen) -> None:
    for path in ("/v1/rooms/s1/boxes/t1", "/v1/rooms/s1/things", "/v1/rooms/s1/things/t1/x"):
        r = await kitchen.http.get(path)
        assert r.status_code == 404, path
        assert r.json()["code"] == 5
        assert reason(r) == "NO_ROUTE"
    assert kitchen.servicer.calls == {}


async def test_double_star_takes_the_rest_of_the_path(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/files/etc/app/config.yaml")
    assert r.status_code == 200
    # response_body: only the `meta` field is the body.
    assert r.json() == {"path": "etc/app/config.yaml", "size": "19"}


async def test_verb_suffix_routes_to_the_custom_method(kitchen: Kitchen) -> None:
    r = await kitchen.http.post("/v1/things/t1:frobnicate", json={"times": 3})
    assert r.status_code == 200
    assert r.json() == {"result": "t1 x3"}


async def test_an_unknown_verb_is_not_found_or_not_allowed(kitchen: Kitchen) -> None:
    r = await kitchen.http.post("/v1/things/t1:explode", json={})
    assert r.status_code == 404


async def test_percent_encoded_slash_in_a_single_segment_variable_is_decoded(
    kitchen: Kitchen,
) -> None:
    status, _, body = await raw_request(
        kitchen.gateway.port,
        b"GET /v1/kitchens/a%2Fb%20c%C3%A9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    assert json.loads(body)["inner"]["id"] == "a/b cé"


async def test_percent_encoded_slash_stays_encoded_in_a_multi_segment_variable(
    kitchen: Kitchen,
) -> None:
    status, _, body = await raw_request(
        kitchen.gateway.port,
        b"GET /v1/rooms/s%2F1/things/t%201 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    assert json.loads(body)["name"] == "rooms/s%2F1/things/t 1"
    # The rest of the path (``**``) is the exception: the OpenAPI document
    # describes it as one parameter, whose slashes clients escape.
    status, _, body = await raw_request(
        kitchen.gateway.port,
        b"GET /v1/files/a%2Fb/c%20d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    assert json.loads(body)["path"] == "a/b/c d"


async def test_a_verb_can_be_sent_encoded_to_be_part_of_a_name(kitchen: Kitchen) -> None:
    status, _, body = await raw_request(
        kitchen.gateway.port,
        b"GET /v1/kitchens/x%3Afrobnicate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    assert json.loads(body)["inner"]["id"] == "x:frobnicate"


async def test_invalid_utf8_in_a_path_variable_is_400(kitchen: Kitchen) -> None:
    status, _, body = await raw_request(
        kitchen.gateway.port,
        b"GET /v1/kitchens/%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 400
    status_body = json.loads(body)
    assert status_body["code"] == 3
    assert "inner.id" in status_body["message"]
    assert kitchen.servicer.calls == {}


async def test_an_empty_segment_does_not_match_a_variable(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/")
    assert r.status_code == 404


# -- query parameters ------------------------------------------------------------


async def test_query_parameters_fill_unbound_fields(kitchen: Kitchen) -> None:
    r = await kitchen.http.get(
        "/v1/kitchens/abc",
        params=[
            ("name", "n"),
            ("int32Value", "-7"),
            ("int64_value", "9007199254740993"),  # proto name works too; beyond a double
            ("uint64Value", "18446744073709551615"),
            ("doubleValue", "1.5"),
            ("boolValue", "true"),
            ("bytesValue", base64.urlsafe_b64encode(b"\xff\xfe").decode()),
            ("color", "COLOR_BLUE"),
            ("tags", "a"),
            ("tags", "b"),
            ("colors", "COLOR_RED"),
            ("colors", "2"),
            ("inner.count", "4"),
            ("when", "2024-05-01T12:00:00Z"),
            ("ttl", "1.5s"),
            ("mask", "name,innerCount"),
            ("maybe", "0"),
            ("flag", "false"),
            ("renamed", "r"),
            ("opt", ""),
            ("times", "2024-01-01T00:00:00Z"),
            ("times", "2025-01-01T00:00:00Z"),
            ("left", "L"),
        ],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "n"
    assert body["int32Value"] == -7
    assert body["int64Value"] == "9007199254740993"
    assert body["uint64Value"] == "18446744073709551615"
    assert body["doubleValue"] == 1.5
    assert body["boolValue"] is True
    assert base64.b64decode(body["bytesValue"]) == b"\xff\xfe"
    assert body["color"] == "COLOR_BLUE"
    assert body["tags"] == ["a", "b"]
    assert body["colors"] == ["COLOR_RED", "COLOR_BLUE"]
    assert body["inner"] == {"id": "abc", "count": 4}  # the path and the query both fill inner
    assert body["when"] == "2024-05-01T12:00:00Z"
    assert body["ttl"] == "1.500s"
    assert body["mask"] == "name,innerCount"
    # A wrapper set to its default is present (it has presence), unlike an int32.
    assert body["maybe"] == 0
    assert body["flag"] is False
    assert body["renamed"] == "r"
    assert body["opt"] == ""
    assert body["times"] == ["2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]
    assert body["left"] == "L"


async def test_a_non_repeated_parameter_given_twice_is_400(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/abc?name=a&name=b")
    assert r.status_code == 400
    assert "given 2 times" in violations(r)["name"]
    # The JSON and proto names of one field are the same parameter.
    r = await kitchen.http.get("/v1/kitchens/abc?int32Value=1&int32_value=2")
    assert r.status_code == 400
    assert "int32_value" in violations(r)
    assert kitchen.servicer.calls == {}


async def test_unknown_and_bound_parameters_are_ignored(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/abc?nope=1&inner.id=other&name.x=1&utm_source=mail")
    assert r.status_code == 200
    # inner.id is bound by the path: the query cannot override it.
    assert r.json()["inner"]["id"] == "abc"
    assert r.json()["name"] == ""


@pytest.mark.parametrize(
    ("query", "field", "words"),
    [
        ("int32Value=x", "int32_value", "integer"),
        ("int32Value=2147483648", "int32_value", "out of range"),
        ("uint32Value=-1", "uint32_value", "out of range"),
        ("boolValue=maybe", "bool_value", "true or false"),
        ("color=PURPLE", "color", "not a value of"),
        ("when=yesterday", "when", "Timestamp"),
        ("ttl=5m", "ttl", "Duration"),
        ("doubleValue=abc", "double_value", "number"),
        ("bytesValue=***", "bytes_value", "base64"),
        ("inner=x", "inner", "set its fields"),
        ("inners.id=x", "inners", "repeated message"),
        ("counts=1", "counts", "map"),
        ("extra=1", "extra", "cannot be set from a URL"),
        ("left=a&right=1", "right", "only one of oneof"),
    ],
)
async def test_a_bad_query_parameter_names_its_field(
    kitchen: Kitchen, query: str, field: str, words: str
) -> None:
    r = await kitchen.http.get(f"/v1/kitchens/abc?{query}")
    assert r.status_code == 400, r.text
    found = violations(r)
    assert field in found, found
    assert words in found[field]
    assert kitchen.servicer.calls == {}


async def test_invalid_utf8_in_the_query_is_400(kitchen: Kitchen) -> None:
    status, _, body = await raw_request(
        kitchen.gateway.port,
        b"GET /v1/kitchens/a?name=%FF HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 400
    assert json.loads(body)["code"] == 3


# -- bodies and the JSON mapping ----------------------------------------------------


async def test_body_star_accepts_json_and_proto_names(kitchen: Kitchen) -> None:
    sent = {
        "name": "n",
        "int64Value": 12,
        "uint32_value": "7",
        "float_value": "NaN",
        "bytesValue": base64.b64encode(b"hi").decode(),
        "color": 2,
        "colors": ["COLOR_RED"],
        "inner": {"id": "i", "count": "3"},
        "inners": [{"id": "a"}, {}],
        "counts": {"x": 1},
        "by_id": {"5": {"id": "five"}},
        "when": "2024-05-01T12:00:00.5+02:00",
        "ttl": "3s",
        "mask": "name,inner.id",
        "maybe": None,
        "flag": True,
        "extra": {"k": [1, "two", None]},
        "right": 9,
        "renamed": "r",
        "anyValue": None,
        "etag": "client-sent",
    }
    r = await kitchen.http.post("/v1/kitchens:echo", json=sent)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["int64Value"] == "12"
    assert body["uint32Value"] == 7
    assert body["floatValue"] == "NaN"
    assert body["color"] == "COLOR_BLUE"
    assert body["inner"] == {"id": "i", "count": 3}
    assert body["inners"] == [{"id": "a", "count": 0}, {"id": "", "count": 0}]
    assert body["byId"] == {"5": {"id": "five", "count": 0}}
    assert body["when"] == "2024-05-01T10:00:00.500Z"
    assert body["mask"] == "name,inner.id"
    assert "maybe" not in body  # null leaves it unset
    assert body["extra"] == {"k": [1, "two", None]}
    assert body["right"] == 9 and "left" not in body
    assert body["anyValue"] is None  # a Value set to JSON null
    assert body["etag"] == "e1"


async def test_responses_are_camel_case_with_unpopulated_fields(kitchen: Kitchen) -> None:
    r = await kitchen.http.post("/v1/kitchens:echo", content=b"")
    assert r.status_code == 200
    body = r.json()
    assert body["int32Value"] == 0
    assert body["int64Value"] == "0"
    assert body["tags"] == []
    assert body["counts"] == {}
    assert body["color"] == "COLOR_UNSPECIFIED"
    assert body["renamed"] == ""  # a custom json_name
    assert "int32_value" not in body
    # Fields with presence (messages, optional, oneof members) are left out when unset.
    assert not {"inner", "opt", "left", "right", "when"} & set(body)
    assert r.headers["content-type"] == "application/json"


async def test_body_field_fills_only_that_field_and_the_rest_comes_from_the_query(
    kitchen: Kitchen,
) -> None:
    r = await kitchen.http.put(
        "/v1/kitchens/k1/inner?int32Value=3&inner.count=99", json={"id": "x", "count": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "k1"
    assert body["inner"] == {"id": "x", "count": 2}  # the query cannot touch the body field
    assert body["int32Value"] == 3


async def test_additional_bindings_reach_the_same_rpc(kitchen: Kitchen) -> None:
    a = await kitchen.http.get("/v1/kitchens/x?name=one")
    b = await kitchen.http.post("/v1/kitchens:echo", json={"name": "one"})
    c = await kitchen.http.put("/v1/kitchens/one/inner", json={})
    assert a.json()["name"] == b.json()["name"] == c.json()["name"] == "one"
    assert kitchen.servicer.calls == {"Echo": 3}


async def test_path_values_win_over_the_body(kitchen: Kitchen) -> None:
    r = await kitchen.http.post(
        "/v1/things/from-path:frobnicate", json={"name": "from-body", "times": 1}
    )
    assert r.json() == {"result": "from-path x1"}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"nope": 1}, "nope", "unknown field"),
        ({"inner": {"idd": "x"}}, "inner.idd", "unknown field"),
        ({"int32Value": "abc"}, "int32_value", "integer"),
        ({"int32Value": 1.5}, "int32_value", "integer"),
        ({"int32Value": True}, "int32_value", "integer"),
        ({"name": 5}, "name", "expected string"),
        ({"boolValue": "true"}, "bool_value", "expected bool"),
        ({"tags": "a"}, "tags", "expected an array"),
        ({"tags": ["a", 2]}, "tags[1]", "expected string"),
        ({"inners": [{"count": "x"}]}, "inners[0].count", "integer"),
        ({"counts": {"a": "b"}}, "counts[a]", "integer"),
        ({"byId": {"x": {}}}, "by_id[x]", "integer"),
        ({"inner": []}, "inner", "expected an object"),
        ({"color": "PURPLE"}, "color", "not a value of"),
        ({"when": "2024-13-01T00:00:00Z"}, "when", "Timestamp"),
        ({"floatValue": 1e39}, "float_value", "out of range"),
        ({"bytesValue": "not base64!"}, "bytes_value", "base64"),
        ({"left": "a", "right": 1}, "right", "only one of oneof"),
        ({"name": "a", "name_": 1}, "name_", "unknown field"),
        ({"int32_value": 1, "int32Value": 2}, "int32_value", "set twice"),
        ({"tags": [None]}, "tags[0]", "expected string"),
        ({"inners": [None]}, "inners[0]", "null"),
    ],
)
async def test_a_bad_body_field_is_400_naming_it(
    kitchen: Kitchen, body: dict[str, Any], field: str, words: str
) -> None:
    r = await kitchen.http.post("/v1/kitchens:echo", json=body)
    assert r.status_code == 400, r.text
    found = violations(r)
    assert field in found, found
    assert words in found[field], found[field]
    assert kitchen.servicer.calls == {}


async def test_every_problem_is_reported_at_once(kitchen: Kitchen) -> None:
    r = await kitchen.http.post(
        "/v1/kitchens:echo", json={"nope": 1, "name": 2, "inner": {"count": "x"}}
    )
    assert set(violations(r)) == {"nope", "name", "inner.count"}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{bad", "not valid JSON"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"[1, 2", "not valid JSON"),
        (b'{"name": NaN}', "must be quoted"),
        (b'{"name": "a", "name": "b"}', "appears twice"),
        (b'{"name": "\xff"}', "not valid UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
    ],
)
async def test_a_body_that_is_not_json_is_400(kitchen: Kitchen, raw: bytes, words: str) -> None:
    r = await kitchen.http.post(
        "/v1/kitchens:echo", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["code"] == 3
    assert reason(r) == "INVALID_JSON"
    assert words in r.json()["message"]
    assert kitchen.servicer.calls == {}


async def test_a_body_that_is_not_an_object_is_400(kitchen: Kitchen) -> None:
    r = await kitchen.http.post("/v1/kitchens:echo", json=[1, 2])
    assert r.status_code == 400
    assert "expected an object" in violations(r)[""]


async def test_a_lone_surrogate_escape_is_invalid_utf8(kitchen: Kitchen) -> None:
    r = await kitchen.http.post(
        "/v1/kitchens:echo",
        content=b'{"name": "\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "UTF-8" in violations(r)["name"]


# -- size limit ------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_and_no_backend_call(start_kitchen: Any) -> None:
    k: Kitchen = await start_kitchen(GatewaySettings(port=0, max_body_bytes=1000))
    big = {"name": "x" * 2000}
    r = await k.http.post("/v1/kitchens:echo", json=big)
    assert r.status_code == 413
    assert r.json()["code"] == 8
    assert reason(r) == "BODY_TOO_LARGE"
    # Without Content-Length (chunked), the limit holds while reading.

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 300

    r = await k.http.post("/v1/kitchens:echo", content=chunks())
    assert r.status_code == 413
    assert k.servicer.calls == {}
    # At the limit is fine, and the gateway keeps serving.
    r = await k.http.post("/v1/kitchens:echo", content=b" " * 998 + b"{}")
    assert r.status_code == 200


# -- headers ------------------------------------------------------------------------


def _metadata(r: httpx.Response) -> dict[str, str]:
    return dict(item.split("=", 1) for item in r.json()["metadata"])


async def test_headers_become_metadata(kitchen: Kitchen) -> None:
    r = await kitchen.http.get(
        "/v1/inspect",
        headers={
            "Authorization": "Bearer abc",
            "Grpc-Metadata-X-Tenant": "t1",
            "Grpc-Metadata-Blob-Bin": base64.b64encode(b"\x00\x01").decode(),
            "X-Forwarded-For": "10.0.0.1",
            "Cookie": "secret=1",
            "X-Other": "not forwarded",
        },
    )
    assert r.status_code == 200
    md = _metadata(r)
    assert md["authorization"] == "Bearer abc"
    assert md["x-tenant"] == "t1"
    assert md["blob-bin"] == "0001"
    assert md["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert md["x-forwarded-host"].startswith("127.0.0.1:")
    assert "cookie" not in md and "x-other" not in md


@pytest.mark.parametrize(
    "header",
    [
        ("Grpc-Metadata-Grpc-Status", "0"),
        ("Grpc-Metadata-Content-Type", "text/plain"),
        ("Grpc-Metadata-Blob-Bin", "!!!"),
        ("Grpc-Metadata-X", "caf\u00e9"),
        ("Grpc-Timeout", "10x"),
        ("Grpc-Timeout", "123456789S"),
        ("X-Request-Timeout", "soon"),
    ],
)
async def test_a_bad_header_is_400(kitchen: Kitchen, header: tuple[str, str]) -> None:
    r = await kitchen.http.get(
        "/v1/inspect", headers=[(header[0].encode(), header[1].encode("latin-1"))]
    )
    assert r.status_code == 400, r.text
    assert reason(r) == "INVALID_HEADER"
    assert kitchen.servicer.calls == {}


async def test_timeouts_become_the_deadline(kitchen: Kitchen) -> None:
    async def remaining(**headers: str) -> float:
        r = await kitchen.http.get("/v1/inspect", headers=headers)
        return float(r.json()["timeRemaining"])

    assert 10 < await remaining(**{"Grpc-Timeout": "20S"}) <= 20.1
    assert 30.5 < await remaining(**{"X-Request-Timeout": "35"}) <= 35.1
    # Both: the smaller wins.
    assert 5 < await remaining(**{"Grpc-Timeout": "15000m", "X-Request-Timeout": "40"}) <= 15.1
    # Neither: the gateway's default (30 s) for unary calls.
    assert 20 < await remaining() <= 30.1


async def test_a_passed_deadline_is_504(kitchen: Kitchen) -> None:
    r = await kitchen.http.get(
        "/v1/watch/t?count=1&intervalMs=2000", headers={"Grpc-Timeout": "100m"}
    )
    assert r.status_code == 504
    assert r.json()["code"] == 4


async def test_trace_context_joins_the_backends_trace(kitchen: Kitchen) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = await kitchen.http.get(
        "/v1/inspect",
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "tracestate": "vendor=v1"},
    )
    md = _metadata(r)
    version, tid, span, _ = md["traceparent"].split("-")
    assert (version, tid) == ("00", trace_id)
    assert span != "00f067aa0ba902b7"  # the gateway's own span is the parent
    assert md["tracestate"] == "vendor=v1"
    # Without one, the gateway starts a trace of its own.
    r = await kitchen.http.get("/v1/inspect")
    assert len(_metadata(r)["traceparent"].split("-")[1]) == 32


async def test_response_metadata_becomes_headers(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/inspect?reply=x-rate=5&reply=x-id=abc")
    assert r.status_code == 200
    assert r.headers["grpc-metadata-x-rate"] == "5"
    assert r.headers["grpc-metadata-x-id"] == "abc"
    assert r.headers["grpc-trailer-x-trailer"] == "done"


# -- streams ------------------------------------------------------------------------


async def test_server_stream_is_ndjson(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/watch/t1?count=3")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines == [{"result": {"topic": "t1", "seq": i}} for i in range(3)]


async def test_a_stream_that_fails_midway_ends_with_an_error_line(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/watch/t1?count=2&failCode=14")
    assert r.status_code == 200
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [x["result"]["seq"] for x in lines[:2]] == [0, 1]
    assert lines[2]["error"]["code"] == 14
    assert lines[2]["error"]["message"] == "the stream broke"


async def test_a_stream_that_fails_before_any_message_is_a_plain_error(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/watch/t1?count=0&failCode=7")
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == 7


async def test_server_stream_as_server_sent_events(kitchen: Kitchen) -> None:
    r = await kitchen.http.get(
        "/v1/watch/t1?count=2&failCode=13", headers={"Accept": "text/event-stream"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == 'data: {"topic":"t1","seq":0}'
    assert events[1] == 'data: {"topic":"t1","seq":1}'
    kind, data = events[2].split("\n")
    assert kind == "event: error"
    assert json.loads(data.removeprefix("data: "))["code"] == 13


async def test_sse_sends_keep_alives_while_idle(start_kitchen: Any) -> None:
    k: Kitchen = await start_kitchen(GatewaySettings(port=0, sse_keepalive=0.05))
    r = await k.http.get(
        "/v1/watch/t?count=2&intervalMs=300", headers={"Accept": "text/event-stream"}
    )
    assert ": keep-alive" in r.text
    assert r.text.count("data: ") == 2


async def test_a_client_that_leaves_cancels_the_stream(kitchen: Kitchen) -> None:
    async with kitchen.http.stream("GET", "/v1/watch/t?count=1000&intervalMs=20") as r:
        async for line in r.aiter_lines():
            assert json.loads(line)["result"]["seq"] == 0
            break
    # The gateway keeps serving after the client hung up.
    await asyncio.sleep(0.1)
    assert (await kitchen.http.get("/v1/kitchens/x")).status_code == 200


async def test_client_stream_takes_an_ndjson_body(kitchen: Kitchen) -> None:
    body = b'{"value": 1}\n\n{"value": 2}\n{"value": "3"}\n'
    r = await kitchen.http.post("/v1/uploads", content=body)
    assert r.status_code == 200
    assert r.json() == {"total": 6, "messages": 3}


async def test_a_bad_line_of_a_client_stream_rejects_the_whole_stream(kitchen: Kitchen) -> None:
    r = await kitchen.http.post("/v1/uploads", content=b'{"value": 1}\n{"value": "x"}\n')
    assert r.status_code == 400
    assert "line 2" in violations(r)["value"]
    r = await kitchen.http.post("/v1/uploads", content=b'{"value": 1}\n{oops\n')
    assert r.status_code == 400
    assert kitchen.servicer.calls == {}
