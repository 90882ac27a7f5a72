"""Errors on HTTP: every row of grpc-gateway's status table, the Status JSON body,
the gateway's own 404/405/503, CORS and the fixed endpoints."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from autoecoops.gateway.settings import GatewaySettings
from tests.unit.gateway.conftest import Kitchen

#: DESIGN.md "Errors": gRPC code -> HTTP status.
TABLE = [
    (grpc.StatusCode.CANCELLED, 499),
    (grpc.StatusCode.UNKNOWN, 500),
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.PERMISSION_DENIED, 403),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.ABORTED, 409),
    (grpc.StatusCode.OUT_OF_RANGE, 400),
    (grpc.StatusCode.UNIMPLEMENTED, 501),
    (grpc.StatusCode.INTERNAL, 500),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DATA_LOSS, 500),
    (grpc.StatusCode.UNAUTHENTICATED, 401),
]

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize(("code", "http"), TABLE, ids=[c.name for c, _ in TABLE])
async def test_each_grpc_code_has_its_http_status_and_a_status_body(
    kitchen: Kitchen, code: grpc.StatusCode, http: int
) -> None:
    r = await kitchen.http.get(f"/v1/fail/{code.value[0]}?message=boom")
    assert r.status_code == http
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == code.value[0]
    assert body["message"] == "boom"
    # The backend's details come through with their @type.
    info = body["details"][0]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == code.name
    assert info["domain"] == "autoecoops.io"
    if http == 401:
        assert r.headers["www-authenticate"] == 'Bearer realm="autoecoops"'
    else:
        assert "www-authenticate" not in r.headers
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        assert r.headers["retry-after"] == "3"  # RetryInfo 2.5 s, rounded up
        assert body["details"][1]["retryDelay"] == "2.500s"


async def test_a_rejected_token_says_so_in_the_challenge(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/secret", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="autoecoops", error="invalid_token"'
    r = await kitchen.http.get("/v1/secret", headers={"Authorization": "Bearer good"})
    assert r.json() == {"secret": "s3cret"}


async def test_no_authorization_header_means_no_authorization_metadata(kitchen: Kitchen) -> None:
    # The gateway never lends a caller an identity of its own.
    r = await kitchen.http.get("/v1/inspect")
    assert not [m for m in r.json()["metadata"] if m.startswith("authorization=")]


async def test_unknown_path_is_404_with_a_status(kitchen: Kitchen) -> None:
    for path in ("/", "/v2/kitchens/x", "/v1/kitchens/x/y/z", "/v1/nothing"):
        r = await kitchen.http.get(path)
        assert r.status_code == 404, path
        assert r.json()["code"] == 5


async def test_wrong_method_is_405_with_allow(kitchen: Kitchen) -> None:
    r = await kitchen.http.delete("/v1/kitchens/x")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert r.json()["code"] == 12
    r = await kitchen.http.get("/v1/kitchens:echo")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    r = await kitchen.http.post("/healthz")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert kitchen.servicer.calls == {}


async def test_a_backend_that_is_down_is_503_and_the_gateway_keeps_serving(
    start_kitchen: Any,
) -> None:
    k: Kitchen = await start_kitchen(backend=False)
    for _ in range(2):
        r = await k.http.get("/v1/kitchens/x")
        assert r.status_code == 503
        body = r.json()
        assert body["code"] == 14
        assert body["message"] == "kitchen is unavailable; retry later"
        assert "127.0.0.1" not in r.text
        assert body["details"][0]["reason"] == "BACKEND_UNAVAILABLE"
    r = await k.http.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "NOT_SERVING", "backends": {"kitchen": "UNAVAILABLE"}}


async def test_healthz_aggregates_the_backends(kitchen: Kitchen) -> None:
    # The test backend has no health service: that is reported, not hidden.
    r = await kitchen.http.get("/healthz")
    assert r.status_code == 503
    assert r.json()["backends"] == {"kitchen": "UNIMPLEMENTED"}
    assert r.headers["cache-control"] == "no-store"


async def test_openapi_is_served_as_json_and_yaml(kitchen: Kitchen) -> None:
    import yaml

    r = await kitchen.http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    assert "/v1/kitchens/{inner_id}" in doc["paths"]
    r = await kitchen.http.get("/openapi.yaml")
    assert r.headers["content-type"] == "application/yaml"
    assert yaml.safe_load(r.text) == doc


async def test_docs_is_swagger_ui_from_the_bundle(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "/console/swagger-ui/swagger-ui-bundle.js" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    js = await kitchen.http.get("/console/swagger-ui/swagger-ui-bundle.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    again = await kitchen.http.get(
        "/console/swagger-ui/swagger-ui-bundle.js", headers={"if-none-match": js.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""


async def test_console_files_and_unknown_ones(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/console")
    assert r.status_code == 200 and "/console/console.js" in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    assert r.headers["x-content-type-options"] == "nosniff"
    missing = await kitchen.http.get("/console/nope.js")
    assert missing.status_code == 404 and missing.json()["code"] == 5
    posted = await kitchen.http.post("/console/console.js")
    assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
    escape = await kitchen.http.get("/console/../../pyproject.toml")
    assert escape.status_code == 404


# -- CORS ----------------------------------------------------------------------


async def test_cors_is_off_by_default(kitchen: Kitchen) -> None:
    r = await kitchen.http.get("/v1/kitchens/x", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    r = await kitchen.http.options(
        "/v1/kitchens/x",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
    )
    assert r.status_code == 405


async def test_cors_preflight_and_request_for_an_allowed_origin(start_kitchen: Any) -> None:
    settings = GatewaySettings(port=0, cors_origins=("https://app.example",), cors_max_age=60)
    k: Kitchen = await start_kitchen(settings)
    r = await k.http.options(
        "/v1/kitchens/x",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Authorization, Grpc-Metadata-X-Tenant",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["access-control-allow-methods"] == "GET"
    assert r.headers["access-control-allow-headers"] == "authorization, grpc-metadata-x-tenant"
    assert r.headers["access-control-max-age"] == "60"
    assert r.headers["vary"] == "Origin"
    r = await k.http.get("/v1/inspect?reply=x-id=1", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert (
        r.headers["access-control-expose-headers"] == "grpc-metadata-x-id, grpc-trailer-x-trailer"
    )
    # Errors carry CORS headers too, so a browser can read them.
    r = await k.http.get("/v1/fail/5", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


async def test_cors_refuses_other_origins_methods_and_headers(start_kitchen: Any) -> None:
    k: Kitchen = await start_kitchen(GatewaySettings(port=0, cors_origins=("https://app.example",)))
    r = await k.http.get("/v1/kitchens/x", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    r = await k.http.options(
        "/v1/kitchens/x",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"},
    )
    assert r.status_code == 405
    r = await k.http.options(
        "/v1/kitchens/x",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "X-Evil",
        },
    )
    assert r.status_code == 403
    assert "x-evil" in r.json()["message"]


async def test_cors_wildcard(start_kitchen: Any) -> None:
    k: Kitchen = await start_kitchen(GatewaySettings(port=0, cors_origins=("*",)))
    r = await k.http.get("/v1/kitchens/x", headers={"Origin": "https://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"
