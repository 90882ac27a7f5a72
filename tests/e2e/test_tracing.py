"""Traces leave the process: three processes (the gateway, auth-service and
policy-audit, each `autoecoops serve`) export OTLP to a real receiver, the
collector's TraceService from opentelemetry-proto served by this test. One
REST call through the gateway into auth-service, which appends its audit entry
to policy-audit, is one trace: a parent-child chain across all three
processes, and the same trace id in the audit entry."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from autoecoops.kernel.mesh.config import SERVICES
from tests.conftest import free_port
from tests.e2e.conftest import BIN, clean_env, serve, wait_serving

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Span:
    """An exported span and the service.name of the process that sent it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            attrs.get("service.name", ""),
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.kind,
                        )
                    )
        with self._lock:
            self.spans += got
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_one_rest_call_is_one_trace_across_three_processes(
    receiver: tuple[Receiver, int], redis_url: str, tmp_path: Path
) -> None:
    spans, otlp_port = receiver
    prefix = f"autoecoops-test:{uuid.uuid4().hex[:10]}:"
    env = clean_env()
    for svc in SERVICES:
        env[f"AUTOECOOPS_{svc.env}_PORT"] = str(free_port())
    gateway_port = free_port()
    env.update(
        {
            "REDIS_URL": redis_url,
            "AUTOECOOPS_KEY_PREFIX": prefix,
            "AUTOECOOPS_DATA_DIR": str(tmp_path / "data"),
            "AUTOECOOPS_GATEWAY_PORT": str(gateway_port),
            # The standard variables, nothing of ours.
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        for name in ("auth-service", "policy-audit", "gateway"):
            log = tmp_path / f"{name}.log"
            procs.append(serve(name, env, log))
            wait_serving(log, procs[-1])
        token = subprocess.run(
            [str(BIN / "autoecoops"), "token", "--subject", "alice", "--roles", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{gateway_port}"
        created = httpx.post(
            f"{base}/v1/roles",
            json={"name": "traced", "permissions": ["memory.*"]},
            headers=auth,
            timeout=20,
        )
        assert created.status_code == 200, created.text
        # The audit entry of the call names its trace.
        listed = httpx.get(
            f"{base}/v1/audit/entries", params={"pageSize": 100}, headers=auth, timeout=20
        )
        assert listed.status_code == 200, listed.text
        entries = [e for e in listed.json()["entries"] if "traced" in e.get("resource", "")]
        assert entries, listed.json()
        trace_id = entries[-1]["traceId"]
        assert len(trace_id) == 32

        # Since the audit outbox (issue 13) the audit append is made by the relay,
        # batched and outside the call, so the call's own chain is gateway ->
        # auth-service; the audit entry keeps the call's trace id (checked above).
        deadline = time.monotonic() + 30
        chain: list[Span] = []
        while time.monotonic() < deadline:
            chain = spans.of_trace(trace_id)
            if {"gateway", "auth-service"} <= {s.service for s in chain}:
                break
            time.sleep(0.2)
        services = {s.service for s in chain}
        assert {"gateway", "auth-service"} <= services, chain
        by_id = {s.span_id: s for s in chain}
        (create,) = [
            s for s in chain if s.service == "auth-service" and s.name.endswith("CreateRole")
        ]
        root = by_id.get(create.parent_id)
        assert root is not None, f"the parent of {create} was not exported: {chain}"
        assert root.service == "gateway" and root.parent_id == ""
        assert root.name.startswith("POST /v1/roles")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
