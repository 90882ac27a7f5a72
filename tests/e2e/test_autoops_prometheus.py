"""The loop with SLIs from a real Prometheus server.

A real ``prometheus`` (Debian's package) runs on a loopback port and scrapes two
targets every second: an HTTP service this test drives (its request counters) and the
mesh's own /metrics. The platform reads the SLO's ratio through Prometheus's HTTP
query API; when the service starts failing the page fires, the runbook's webhook
"fixes" the service, a PromQL verification sees the errors stop, and the alert resolves.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import autoops_pb2_grpc
from autoecoops.common.v1 import types_pb2
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import MintToken, StartMesh, free_port
from tests.integration.autoops.conftest import audit_entries, bearer, events

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing: ./dev test installs Debian's prometheus package"
)


class Service:
    """A target Prometheus scrapes: 100 requests a second, failing while ``broken``."""

    def __init__(self) -> None:
        self.good = 0.0
        self.bad = 0.0
        self.broken = False
        self.fixes = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                good, bad = svc.counts()
                body = (
                    "# TYPE http_requests_total counter\n"
                    f'http_requests_total{{code="200"}} {good}\n'
                    f'http_requests_total{{code="500"}} {bad}\n'
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # the runbook's webhook: roll the bad change back
                self.rfile.read(int(self.headers.get("content-length", 0)))
                svc.fixes += 1
                svc.counts()
                svc.broken = False
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            now = time.monotonic()
            n = (now - self._last) * 100
            self._last = now
            if self.broken:
                self.bad += n * 0.5
                self.good += n * 0.5
            else:
                self.good += n
            return int(self.good), int(self.bad)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.close()


@pytest.fixture
def prometheus(tmp_path: Path, service: Service) -> Iterator[str]:
    from prometheus_client import start_http_server

    metrics_port = free_port()
    mesh_metrics, thread = start_http_server(metrics_port, addr="127.0.0.1")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: shop
    static_configs: [{{targets: ["127.0.0.1:{service.port}"]}}]
  - job_name: autoecoops
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
"""
    )
    assert PROMETHEUS is not None
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("prometheus did not become ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        mesh_metrics.shutdown()
        thread.join(timeout=5)


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, prometheus: str) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_PROMETHEUS_URL", prometheus)
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "1")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "off")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_VERIFY_POLL_SECONDS", "0.5")
    return await start_mesh(["auth-service", "policy-audit", "event-bus", "autoops"], secure=True)


def dur(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


async def wait_for(what: str, check: Any, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def test_slis_from_a_real_prometheus_fire_remediate_and_resolve(
    mesh: Mesh, mint_token: MintToken, service: Service, prometheus: str
) -> None:
    md = bearer(mint_token("alice", ["admin"]))
    ops = autoops_pb2_grpc.AutoOpsServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("autoops"))
    )
    slo = pb.Slo(
        service="shop",
        objective=0.99,
        indicator=pb.Indicator(
            source=pb.SLI_SOURCE_PROMETHEUS,
            ratio=pb.RatioIndicator(
                bad='http_requests_total{job="shop",code=~"5.."}',
                total='http_requests_total{job="shop"}',
            ),
        ),
        time_window=pb.TimeWindow(rolling=dur(3600)),
        alert_policy=pb.AlertPolicy(
            windows=[
                pb.BurnRateWindow(
                    long_window=dur(60),
                    short_window=dur(10),
                    burn_rate=10,
                    severity=types_pb2.SEVERITY_CRITICAL,
                )
            ]
        ),
    )
    await ops.CreateSlo(pb.CreateSloRequest(slo_id="shop-availability", slo=slo), metadata=md)
    runbook = pb.Runbook(
        trigger=pb.RunbookTrigger(slo_alert=pb.SloAlertTrigger(slo="slos/shop-availability")),
        target="shop",
        steps=[
            pb.RunbookStep(
                name="undo-release",
                action=pb.STEP_ACTION_WEBHOOK,
                target=f"http://127.0.0.1:{service.port}/rollback",
                verification=pb.Verification(
                    promql='(sum(increase(http_requests_total{job="shop",code=~"5.."}[5s])) or vector(0)) == 0',
                    delay=dur(2),
                    timeout=dur(60),
                ),
            )
        ],
    )
    await ops.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="undo", runbook=runbook), metadata=md
    )

    # Healthy traffic first, read through Prometheus.
    async def counted() -> bool:
        b = (
            await ops.GetErrorBudget(
                pb.GetErrorBudgetRequest(slo="slos/shop-availability"), metadata=md
            )
        ).error_budget
        return b.total_count > 200 and b.status == pb.ERROR_BUDGET_STATUS_HEALTHY

    await wait_for("traffic in Prometheus", counted)
    rules = (await ops.GetPrometheusRules(pb.GetPrometheusRulesRequest(), metadata=md)).rules_yaml
    assert "ShopAvailabilityPageAlert" in rules

    service.broken = True  # half the requests fail: burn 50x

    async def paged() -> list[pb.Alert]:
        got = await ops.ListAlerts(pb.ListAlertsRequest(slo="slos/shop-availability"), metadata=md)
        return list(got.alerts)

    (alert,) = await wait_for("the page", paged)
    assert alert.long_burn_rate > 10 and alert.short_burn_rate > 10

    async def ended() -> pb.Remediation | None:
        got = await ops.ListRemediations(pb.ListRemediationsRequest(), metadata=md)
        done = [
            r
            for r in got.remediations
            if r.state in (pb.REMEDIATION_STATE_SUCCEEDED, pb.REMEDIATION_STATE_FAILED)
        ]
        return done[0] if done else None

    rem = await wait_for("the remediation", ended, within=90)
    assert rem.state == pb.REMEDIATION_STATE_SUCCEEDED, rem.message
    assert service.fixes == 1 and not service.broken
    assert "returned 1 series" in rem.step_results[0].message

    async def resolved() -> bool:
        a = (await ops.GetAlert(pb.GetAlertRequest(name=alert.name), metadata=md)).alert
        return a.state == pb.ALERT_STATE_RESOLVED

    await wait_for("the alert to resolve", resolved)
    kinds = [e.type for e in await events(mesh, md, "autoops.slo", want=2)]
    assert kinds == ["autoecoops.autoops.slo.breached", "autoecoops.autoops.slo.resolved"]
    trail = await audit_entries(mesh, md)
    assert {e.trace_id for e in trail if e.resource == rem.name} == {alert.trace_id}

    # The mesh's own /metrics is scraped too: its RPC counters are queryable in PromQL.
    async with httpx.AsyncClient() as http:
        reply = await http.get(
            f"{prometheus}/api/v1/query",
            params={
                "query": 'sum(autoecoops_grpc_server_handled_total{grpc_service="autoecoops.autoops.v1.AutoOpsService"})'
            },
        )
    assert float(reply.json()["data"]["result"][0]["value"][1]) > 0
