"""REST cases found by fuzzing, against the real gateway in front of real
services: dead-letter ranges at the epoch, a ``**`` path sent as a generated
client sends it, and the built-in roles the mesh runs on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from autoecoops.gateway import GatewaySettings, MeshWithGateway
from tests.conftest import MintToken, make_config


@pytest.fixture
async def http(
    redis_url: str, key_prefix: str, tmp_path: Path, mint_token: MintToken
) -> AsyncIterator[httpx.AsyncClient]:
    config = make_config(
        redis_url=redis_url, key_prefix=key_prefix, data_dir=tmp_path, shutdown_grace=1.0
    )
    mesh = MeshWithGateway(config, settings=GatewaySettings(port=0))
    await mesh.start(["auth-service", "policy-audit", "event-bus"])
    try:
        assert mesh.gateway is not None
        token = mint_token("root", ["admin"])
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{mesh.gateway.port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=20,
        ) as client:
            yield client
    finally:
        await mesh.stop(grace=0)


def reason(response: httpx.Response) -> str:
    for d in response.json()["details"]:
        if d["@type"].endswith("google.rpc.ErrorInfo"):
            return str(d["reason"])
    raise AssertionError(f"no ErrorInfo in {response.text}")


TOPIC = "infra.sync"


@pytest.mark.parametrize("verb", ["purge", "redrive"])
async def test_dead_letter_ranges_at_the_epoch(http: httpx.AsyncClient, verb: str) -> None:
    url = f"/v1/events/topics/{TOPIC}/deadLetters:{verb}"
    count = "purgedCount" if verb == "purge" else "redrivenCount"
    empty = [
        {"endTime": "1970-01-01T00:00:00Z"},
        {"endTime": "1969-12-31T23:59:59Z"},
        {"startTime": "1960-01-01T00:00:00Z", "endTime": "1970-01-01T00:00:00Z"},
        {"startTime": "2024-01-01T00:00:00Z", "endTime": "2024-01-01T00:00:00Z"},
        {"startTime": "1969-01-01T00:00:00Z"},
    ]
    for flt in empty:
        r = await http.post(url, json={"filter": flt})
        assert r.status_code == 200, (flt, r.text)
        assert int(r.json()[count]) == 0, flt
    r = await http.post(
        url,
        json={"filter": {"startTime": "2024-01-02T00:00:00Z", "endTime": "1970-01-01T00:00:00Z"}},
    )
    assert r.status_code == 400, r.text
    assert reason(r) == "INVALID_TIME_RANGE"


async def test_a_double_star_path_escaped_by_a_generated_client_is_the_same_path(
    http: httpx.AsyncClient,
) -> None:
    body = {"input": {"change": {"approvals": []}}}
    raw = await http.post("/v1/data/autoecoops/changes/approval", json=body)
    escaped = await http.post("/v1/data/autoecoops%2Fchanges%2Fapproval", json=body)
    assert raw.status_code == 200, raw.text
    assert escaped.status_code == 200, escaped.text
    assert raw.json()["result"] == escaped.json()["result"]


@pytest.mark.parametrize("role", ["admin", "viewer", "mesh-service"])
async def test_built_in_roles_cannot_be_deleted_or_changed(
    http: httpx.AsyncClient, role: str
) -> None:
    deleted = await http.delete(f"/v1/roles/{role}")
    assert deleted.status_code == 400, deleted.text
    assert deleted.json()["code"] == 9  # FAILED_PRECONDITION
    assert reason(deleted) == "BUILTIN_ROLE"
    changed = await http.patch(
        f"/v1/roles/{role}",
        json={"permissions": ["memory.*"]},
        params={"updateMask": "permissions"},
    )
    assert changed.status_code == 400, changed.text
    assert reason(changed) == "BUILTIN_ROLE"
    still = await http.get(f"/v1/roles/{role}")
    assert still.status_code == 200
    assert still.json()["role"]["permissions"] != ["memory.*"]
    # Roles of one's own are still the admin's to delete.
    made = await http.post("/v1/roles", json={"name": f"own-{role}", "permissions": ["memory.*"]})
    assert made.status_code == 200, made.text
    assert (await http.delete(f"/v1/roles/own-{role}")).status_code == 200
