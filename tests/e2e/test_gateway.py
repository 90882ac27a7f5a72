"""The REST gateway in front of the whole mesh, as `autoecoops up` runs it:
all eight services and the gateway in one process (here on a thread of its
own, so the tests can be plain HTTP clients), with a real Redis and real tokens.

The schemathesis run generates requests for every operation of the served
/openapi.json, anonymous and as an admin, and fails on any 5xx other than a
documented 501 UNIMPLEMENTED, or any response the document does not describe
(status, content type, headers, body schema).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from autoecoops.gateway import GatewaySettings, MeshWithGateway
from autoecoops.kernel.mesh.config import SERVICE_NAMES
from tests.conftest import MintToken, make_config

pytestmark = pytest.mark.e2e

GENERATED = Path(__file__).resolve().parents[2] / "gen" / "openapi" / "openapi.json"
#: Examples per operation and identity; CI keeps it small, a deeper local run
#: sets e.g. AUTOECOOPS_TEST_FUZZ_EXAMPLES=50.
EXAMPLES = int(os.environ.get("AUTOECOOPS_TEST_FUZZ_EXAMPLES", "5"))


@dataclass
class RestMesh:
    """The running mesh behind its gateway."""

    base: str
    admin_token: str


@pytest.fixture(scope="module")
def rest_mesh(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestMesh]:
    """All services plus the gateway on free ports, under a Redis prefix of their own."""
    data = tmp_path_factory.mktemp("rest-mesh")
    prefix = f"autoecoops-test:{uuid.uuid4().hex[:10]}:"
    config = make_config(redis_url=redis_url, key_prefix=prefix, data_dir=data, shutdown_grace=1.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="rest-mesh", daemon=True)
    thread.start()
    mesh = MeshWithGateway(config, settings=GatewaySettings(port=0))
    try:
        asyncio.run_coroutine_threadsafe(mesh.start(list(SERVICE_NAMES)), loop).result(120)
        assert mesh.gateway is not None
        yield RestMesh(f"http://127.0.0.1:{mesh.gateway.port}", MintToken(data)("root", ["admin"]))
    finally:
        asyncio.run_coroutine_threadsafe(mesh.stop(grace=0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def http(rest_mesh: RestMesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rest_mesh.base, timeout=10) as client:
        yield client


def test_healthz_reports_every_backend_serving(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "SERVING",
        "backends": dict.fromkeys(sorted(SERVICE_NAMES), "SERVING"),
    }


def test_a_public_rpc_answers_over_rest(http: httpx.Client) -> None:
    r = http.get("/.well-known/openid-configuration")
    assert r.status_code == 200
    assert r.json()["issuer"]
    jwks = http.get("/.well-known/jwks.json")
    assert jwks.status_code == 200
    assert jwks.json()["keys"]


def test_a_protected_rpc_needs_a_token_and_the_gateway_lends_none(http: httpx.Client) -> None:
    r = http.get("/v1/roles")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert body["code"] == 16
    assert body["details"][0]["reason"] == "CREDENTIALS_MISSING"


def test_a_token_goes_through_to_the_service(http: httpx.Client, rest_mesh: RestMesh) -> None:
    auth = {"Authorization": f"Bearer {rest_mesh.admin_token}"}
    created = http.post(
        "/v1/roles",
        json={"name": "gateway-e2e", "permissions": ["memory.*"], "description": "made over REST"},
        headers=auth,
    )
    assert created.status_code == 200, created.text
    got = http.get("/v1/roles/gateway-e2e", headers=auth)
    assert got.status_code == 200
    assert got.json()["role"]["permissions"] == ["memory.*"]
    listed = http.get("/v1/roles", params={"pageSize": 100}, headers=auth)
    assert "gateway-e2e" in [r["name"] for r in listed.json()["roles"]]
    missing = http.get("/v1/roles/no-such-role", headers=auth)
    assert missing.status_code == 404
    assert missing.json()["code"] == 5


def test_bad_input_never_reaches_the_service(http: httpx.Client) -> None:
    r = http.post("/v1/auth/token", json={"clientId": 5})
    assert r.status_code == 400
    (violation,) = r.json()["details"][1]["fieldViolations"]
    assert violation["field"] == "client_id"
    assert violation["description"] == "expected string, got a number"
    assert http.get("/v1/no/such/api").status_code == 404
    assert http.delete("/v1/roles").status_code == 405


def test_the_served_document_is_the_generated_one(http: httpx.Client) -> None:
    assert http.get("/openapi.json").json() == json.loads(GENERATED.read_text())
    assert http.get("/docs").status_code == 200


def _ndjson_serializer() -> None:
    import schemathesis

    @schemathesis.serializer("application/x-ndjson")
    def ndjson(ctx: Any, value: Any) -> bytes:
        # A client stream of one message.
        return (json.dumps(value) + "\n").encode()


@pytest.mark.parametrize("identity", ["anonymous", "admin"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_response(
    rest_mesh: RestMesh, identity: str
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi import checks

    _ndjson_serializer()
    schema = schemathesis.openapi.from_url(rest_mesh.base + "/openapi.json")
    headers = {"Authorization": f"Bearer {rest_mesh.admin_token}"} if identity == "admin" else {}
    # A deadline for every call, as a careful client sets: a valid watch
    # (WatchAuthorization) streams until the client leaves or the deadline ends it.
    headers["X-Request-Timeout"] = "5"
    conformance = [
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
    ]
    failures: list[str] = []
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), (
            f"the document has an operation schemathesis cannot load: {result}"
        )
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(base_url=rest_mesh.base, headers=headers, timeout=15)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                # UNIMPLEMENTED is the documented answer of an RPC not built yet.
                documented = response.status_code == 501 and response.json().get("code") == 12
                assert documented, f"{response.status_code}: {response.text[:500]}"
            case.validate_response(response, checks=conformance)

        try:
            check()
        except Exception as err:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {err}")
    assert not failures, f"{len(failures)} operations failed:\n" + "\n\n".join(failures)
    # The run reached the services: not everything was turned away at the door.
    assert sum(seen.values()) > len(schema)
