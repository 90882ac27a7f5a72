"""`autoecoops up` driven with the real grpcurl, as a user debugging the mesh would."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from autoecoops.kernel.mesh.config import SERVICES
from tests.e2e.conftest import RunningMesh, start_up, stop

pytestmark = pytest.mark.e2e

GRPC_SERVICES = {
    "auth-service": ["autoecoops.auth.v1.AuthService"],
    "memory-hub": ["autoecoops.memory.v1.MemoryService"],
    "event-bus": ["autoecoops.events.v1.EventBusService"],
    "policy-audit": ["autoecoops.audit.v1.AuditService", "autoecoops.policy.v1.PolicyService"],
    "infra-manager": ["autoecoops.infra.v1.InfraService"],
    "autoops": ["autoecoops.autoops.v1.AutoOpsService"],
    "iaops": ["autoecoops.iaops.v1.IaOpsService"],
    "machine-ops": ["autoecoops.machineops.v1.MachineOpsService"],
}


def test_up_prints_where_every_service_listens(mesh: RunningMesh) -> None:
    text = "".join(mesh.output)
    for svc in SERVICES:
        assert f"grpc://{mesh.addrs[svc.name]}" in text
    assert f"http://127.0.0.1:{mesh.env['AUTOECOOPS_GATEWAY_PORT']}" in text
    assert "all 8 services SERVING" in text


@pytest.mark.parametrize("service", [s.name for s in SERVICES])
def test_reflection_lists_the_services(mesh: RunningMesh, service: str) -> None:
    listed = mesh.grpcurl(service, "list").stdout.split()
    assert sorted(listed) == sorted(
        [
            *GRPC_SERVICES[service],
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )


@pytest.mark.parametrize("service", [s.name for s in SERVICES])
def test_health_of_every_service_is_serving(mesh: RunningMesh, service: str) -> None:
    for name in ["", *GRPC_SERVICES[service]]:
        out = mesh.grpcurl(service, "grpc.health.v1.Health/Check", data={"service": name}).stdout
        assert json.loads(out) == {"status": "SERVING"}


def test_describe_shows_the_method_and_its_options(mesh: RunningMesh) -> None:
    out = mesh.grpcurl("memory-hub", "describe", "autoecoops.memory.v1.MemoryService.Search").stdout
    assert (
        "rpc Search ( .autoecoops.memory.v1.SearchRequest ) returns ( .autoecoops.memory.v1.SearchResponse )"
        in out
    )
    assert "memory.documents.search" in out  # the permission, from the method option
    msg = mesh.grpcurl("memory-hub", "describe", "autoecoops.memory.v1.SearchRequest").stdout
    assert "string query" in msg


def test_protected_call_without_a_token_is_unauthenticated(mesh: RunningMesh) -> None:
    done = mesh.grpcurl(
        "memory-hub", "autoecoops.memory.v1.MemoryService/ListNamespaces", data={}, check=False
    )
    assert done.returncode != 0
    assert "Code: Unauthenticated" in done.stdout + done.stderr
    assert "CREDENTIALS_MISSING" in done.stdout + done.stderr


def test_public_jwks_serves_the_signing_key(mesh: RunningMesh) -> None:
    out = mesh.grpcurl("auth-service", "autoecoops.auth.v1.AuthService/GetJwks", data={}).stdout
    keys = json.loads(out)["keys"]
    assert keys and keys[0]["kty"] == "EC" and keys[0]["alg"] == "ES256" and keys[0]["kid"]


def test_a_token_from_autoecoops_token_is_accepted_across_the_mesh(mesh: RunningMesh) -> None:
    token = mesh.cli("token", "--subject", "alice", "--roles", "admin").strip()
    auth = ("-H", f"authorization: Bearer {token}")
    out = mesh.grpcurl(
        "auth-service", "autoecoops.auth.v1.AuthService/ListRoles", data={}, flags=auth
    ).stdout
    assert "admin" in [r["name"] for r in json.loads(out)["roles"]]
    out = mesh.grpcurl(
        "auth-service",
        "autoecoops.auth.v1.AuthService/VerifyToken",
        data={"token": token},
        flags=auth,
    ).stdout
    assert json.loads(out)["principal"]["subject"] == "alice"
    # A tampered token is refused with a reason, and the service keeps serving.
    bad = ("-H", f"authorization: Bearer {token[:-4]}AAAA")
    done = mesh.grpcurl(
        "auth-service", "autoecoops.auth.v1.AuthService/ListRoles", data={}, flags=bad, check=False
    )
    text = done.stdout + done.stderr
    assert "Code: Unauthenticated" in text and "TOKEN_INVALID" in text


def test_malformed_json_request_is_rejected_and_the_service_keeps_serving(
    mesh: RunningMesh,
) -> None:
    done = mesh.grpcurl(
        "auth-service",
        "autoecoops.auth.v1.AuthService/IssueToken",
        raw_data='{"clientId": 5',
        check=False,
    )
    assert done.returncode != 0
    out = mesh.grpcurl("auth-service", "grpc.health.v1.Health/Check", data={}).stdout
    assert json.loads(out) == {"status": "SERVING"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_and_exits_zero(tmp_path: Path, sig: int) -> None:
    running = start_up(tmp_path)
    assert stop(running, sig) == 0
    assert "drained" in "".join(running.output)
    # The embedded Redis kept its files in the data directory.
    assert (tmp_path / "data" / "appendonly.aof").exists() or (
        tmp_path / "data" / "redis.rdb"
    ).exists()


def test_bad_configuration_fails_at_start_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.e2e.conftest import BIN

    env = {**os.environ, "AUTOECOOPS_EVENT_BUS_PORT": "99999"}
    done = subprocess.run(
        [str(BIN / "autoecoops"), "up"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "autoecoops: invalid configuration: AUTOECOOPS_EVENT_BUS_PORT=99999: must be between 1 and 65535"
    ]
    env = {**os.environ, "REDIS_URL": "http://nope"}
    done = subprocess.run(
        [str(BIN / "autoecoops"), "up"], env=env, capture_output=True, text=True, timeout=30
    )
    assert (
        done.returncode == 2
        and "REDIS_URL" in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )


def test_the_gateway_serves_rest_and_the_contract(mesh: RunningMesh) -> None:
    import httpx

    base = f"http://127.0.0.1:{mesh.env['AUTOECOOPS_GATEWAY_PORT']}"
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{base}/openapi.json", timeout=10).json()["openapi"].startswith("3.1")
    token = mesh.cli("token", "--subject", "alice", "--roles", "admin").strip()
    roles = httpx.get(f"{base}/v1/roles", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert roles.status_code == 200 and "admin" in [r["name"] for r in roles.json()["roles"]]
    denied = httpx.get(f"{base}/v1/roles", timeout=10)
    assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")
