"""Runbooks and remediations over gRPC in a real mesh: steps, verification, escalation,
safeguards (cooldown, rate limit, approval decided by policy-audit's Rego, dry run,
cancel), the audit trail, the events, and surviving a platform restart."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import autoops_pb2_grpc
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import events_pb2 as infra_events
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import MintToken, StartMesh, base_key
from tests.integration.autoops.conftest import audit_entries, autoops, bearer, details, events


class Hook:
    """A real HTTP webhook receiver on a loopback port."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hook.calls.append({"path": self.path, "body": json.loads(body or b"{}")})
                time.sleep(hook.delay)
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def webhook_runbook(url: str, **safeguards: Any) -> pb.Runbook:
    return pb.Runbook(
        description="tell the on-call bot",
        target="web",
        steps=[
            pb.RunbookStep(
                name="notify",
                action=pb.STEP_ACTION_WEBHOOK,
                target=f"{url}/notify",
                parameters=struct_pb2.Struct(fields={"body": struct_pb2.Value(string_value="x")}),
            )
        ],
        safeguards=pb.Safeguards(**safeguards),
        escalation=pb.Escalation(webhook_url=f"{url}/escalate"),
    )


async def settled(stub: autoops_pb2_grpc.AutoOpsServiceStub, md: Any, name: str) -> pb.Remediation:
    ended = {
        pb.REMEDIATION_STATE_SUCCEEDED,
        pb.REMEDIATION_STATE_FAILED,
        pb.REMEDIATION_STATE_CANCELLED,
        pb.REMEDIATION_STATE_SKIPPED,
    }
    for _ in range(300):
        rem = (
            await stub.GetRemediation(pb.GetRemediationRequest(name=name), metadata=md)
        ).remediation
        if rem.state in ended:
            return rem
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not end: {rem}")


async def test_a_manual_run_acts_audits_and_publishes(
    mesh: Mesh, mint_token: MintToken, hook: Hook
) -> None:
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))
    rb = (
        await stub.CreateRunbook(
            pb.CreateRunbookRequest(runbook_id="notify", runbook=webhook_runbook(hook.url)),
            metadata=md,
        )
    ).runbook
    assert rb.name == "runbooks/notify" and rb.etag
    run = pb.RunRunbookRequest(name=rb.name, reason="checking", request_id="run-1")
    started = (await stub.RunRunbook(run, metadata=md)).remediation
    assert started.initiated_by == "alice" and started.target == "web"
    again = (await stub.RunRunbook(run, metadata=md)).remediation
    assert again.name == started.name  # the retry does not start a second one
    done = await settled(stub, md, started.name)
    assert done.state == pb.REMEDIATION_STATE_SUCCEEDED, done.message
    assert [r.state for r in done.step_results] == [pb.STEP_STATE_SUCCEEDED]
    assert [c["path"] for c in hook.calls] == ["/notify"]
    assert hook.calls[0]["body"] == {
        "remediation": started.name,
        "target": "web",
        "reason": "checking",
        "message": "x",
    }

    # The run's steps are recorded by the remediation's own task, after the RPC
    # answered: their entries reach the log moments after the state does.
    for _ in range(100):
        trail = await audit_entries(mesh, md)
        mine = [e for e in trail if e.resource == started.name]
        actions = [e.action for e in mine]
        if "autoops.remediation.complete" in actions:
            break
        await asyncio.sleep(0.1)
    assert actions[:1] == ["autoops.remediation.decide"]
    assert "autoops.remediation.create" in actions and "autoops.remediation.step" in actions
    assert actions[-1] == "autoops.remediation.complete"
    assert len({e.trace_id for e in mine}) == 1 and mine[0].trace_id == done.trace_id
    decided = next(e for e in mine if e.action == "autoops.remediation.decide")
    assert decided.decision_id  # the shipped Rego policy answered
    got = await events(mesh, md, "autoops.remediation", want=2)
    assert [e.type for e in got] == [
        "autoecoops.autoops.remediation.started",
        "autoecoops.autoops.remediation.completed",
    ]


async def test_failed_steps_escalate_by_event_and_webhook(
    mesh: Mesh, mint_token: MintToken, hook: Hook
) -> None:
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))
    hook.status = 500
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="notify", runbook=webhook_runbook(hook.url)), metadata=md
    )
    rem = (
        await stub.RunRunbook(pb.RunRunbookRequest(name="runbooks/notify", reason="x"), metadata=md)
    ).remediation
    done = await settled(stub, md, rem.name)
    assert done.state == pb.REMEDIATION_STATE_FAILED and "escalated" in done.message
    assert "answered 500" in done.step_results[0].message
    assert [c["path"] for c in hook.calls] == ["/notify", "/escalate"]
    assert hook.calls[1]["body"]["remediation"] == rem.name
    got = await events(mesh, md, "autoops.remediation", want=3)
    assert "autoecoops.autoops.remediation.escalated" in [e.type for e in got]


async def test_safeguards_cooldown_rate_limit_and_dry_run(
    mesh: Mesh, mint_token: MintToken, hook: Hook
) -> None:
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))
    cool = webhook_runbook(hook.url, cooldown=duration_pb2.Duration(seconds=600))
    await stub.CreateRunbook(pb.CreateRunbookRequest(runbook_id="cool", runbook=cool), metadata=md)
    first = (
        await stub.RunRunbook(pb.RunRunbookRequest(name="runbooks/cool", reason="a"), metadata=md)
    ).remediation
    await settled(stub, md, first.name)
    second = (
        await stub.RunRunbook(pb.RunRunbookRequest(name="runbooks/cool", reason="b"), metadata=md)
    ).remediation
    assert second.state == pb.REMEDIATION_STATE_SKIPPED and second.message.startswith("cooldown")
    # Another target is not in cooldown; the rate limit of one run an hour holds it instead.
    limited = webhook_runbook(hook.url, max_runs_per_hour=1)
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="limited", runbook=limited), metadata=md
    )
    third = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/limited", reason="c", target="api"), metadata=md
        )
    ).remediation
    await settled(stub, md, third.name)
    fourth = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/limited", reason="d", target="api"), metadata=md
        )
    ).remediation
    assert fourth.state == pb.REMEDIATION_STATE_SKIPPED and fourth.message.startswith("rate limit")

    calls = len(hook.calls)
    dry = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/limited", reason="e", target="db", dry_run=True),
            metadata=md,
        )
    ).remediation
    done = await settled(stub, md, dry.name)
    assert done.state == pb.REMEDIATION_STATE_SUCCEEDED and done.dry_run
    assert done.step_results[0].dry_run and done.step_results[0].message.startswith("dry run")
    assert len(hook.calls) == calls  # nothing was called
    skipped = [e for e in await audit_entries(mesh, md) if e.action == "autoops.remediation.skip"]
    assert {e.resource for e in skipped} == {second.name, fourth.name}


async def test_approval_gate_approve_and_cancel(
    mesh: Mesh, mint_token: MintToken, hook: Hook
) -> None:
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))
    gated = webhook_runbook(hook.url, requires_approval=True)
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="gated", runbook=gated), metadata=md
    )
    rem = (
        await stub.RunRunbook(pb.RunRunbookRequest(name="runbooks/gated", reason="a"), metadata=md)
    ).remediation
    assert rem.state == pb.REMEDIATION_STATE_AWAITING_APPROVAL and rem.decision_id
    assert rem.message == "the runbook requires approval"
    await asyncio.sleep(0.2)
    assert not hook.calls  # nothing runs before the approval
    with pytest.raises(grpc.aio.AioRpcError) as err:  # four eyes: not by who started it
        await stub.ApproveRemediation(pb.ApproveRemediationRequest(name=rem.name), metadata=md)
    assert details(err.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "SELF_APPROVAL")
    bob = bearer(mint_token("bob", ["admin"]))
    approved = (
        await stub.ApproveRemediation(
            pb.ApproveRemediationRequest(name=rem.name, comment="go"), metadata=bob
        )
    ).remediation
    assert approved.approved_by == "bob"
    done = await settled(stub, md, rem.name)
    assert done.state == pb.REMEDIATION_STATE_SUCCEEDED and len(hook.calls) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        other = (
            await stub.RunRunbook(
                pb.RunRunbookRequest(name="runbooks/gated", reason="b", target="t2"), metadata=md
            )
        ).remediation
        await stub.CancelRemediation(
            pb.CancelRemediationRequest(name=other.name, reason="no"), metadata=md
        )
        await stub.ApproveRemediation(pb.ApproveRemediationRequest(name=other.name), metadata=bob)
    assert details(err.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_AWAITING_APPROVAL")
    cancelled = (
        await stub.GetRemediation(pb.GetRemediationRequest(name=other.name), metadata=md)
    ).remediation
    assert cancelled.state == pb.REMEDIATION_STATE_CANCELLED and len(hook.calls) == 1
    listed = await stub.ListRemediations(
        pb.ListRemediationsRequest(runbook="runbooks/gated", state=pb.REMEDIATION_STATE_CANCELLED),
        metadata=md,
    )
    assert [r.name for r in listed.remediations] == [other.name]


async def test_bad_runbooks_and_unknown_remediations(mesh: Mesh, mint_token: MintToken) -> None:
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))
    bad = pb.Runbook(
        steps=[
            pb.RunbookStep(name="a", action=pb.STEP_ACTION_WEBHOOK, target="not-a-url"),
            pb.RunbookStep(name="a", action=pb.STEP_ACTION_ROLLBACK),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateRunbook(
            pb.CreateRunbookRequest(runbook_id="bad", runbook=bad), metadata=md
        )
    assert details(err.value) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_RUNBOOK",
        ["runbook.steps[0].target", "runbook.steps[1].name", "runbook.steps[1].target"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetRemediation(pb.GetRemediationRequest(name="remediations/nope"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_remediation_survives_a_restart_and_never_repeats_a_step(
    start_mesh: StartMesh,
    mint_token: MintToken,
    hook: Hook,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "off")
    names = ["auth-service", "policy-audit", "event-bus", "autoops"]
    first = await start_mesh(names, secure=True)
    stub, md = autoops(first), bearer(mint_token("alice", ["admin"]))
    two = webhook_runbook(hook.url, requires_approval=True)
    two.steps.append(
        pb.RunbookStep(name="again", action=pb.STEP_ACTION_WEBHOOK, target=f"{hook.url}/again")
    )
    await stub.CreateRunbook(pb.CreateRunbookRequest(runbook_id="two", runbook=two), metadata=md)
    # Two remediations wait for approval when the platform stops.
    a = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/two", reason="a", target="t1"), metadata=md
        )
    ).remediation
    b = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/two", reason="b", target="t2"), metadata=md
        )
    ).remediation
    await first.stop(grace=0)

    # What a crash mid-run leaves in Redis: both RUNNING; b's first step was claimed
    # (started) but never finished.
    r = connect(first.config.redis_url)
    base = base_key(first.config.redis_url, first.config.key_prefix, "autoops")
    for rem in (a, b):
        raw = await r.hget(f"{base}:remediations", rem.name)
        stored = pb.Remediation.FromString(raw)
        stored.state = pb.REMEDIATION_STATE_RUNNING
        await r.hset(f"{base}:remediations", rem.name, stored.SerializeToString())
    await r.hset(f"{base}:remediation:{b.name}:steps", "0", "started")
    await r.aclose()

    second = await start_mesh(names, secure=True)
    stub = autoops(second)
    done_a = await settled(stub, md, a.name)
    done_b = await settled(stub, md, b.name)
    assert done_a.state == pb.REMEDIATION_STATE_SUCCEEDED  # resumed and ran its first step
    assert done_b.state == pb.REMEDIATION_STATE_FAILED
    assert "not re-run" in done_b.message
    assert done_b.step_results[0].state == pb.STEP_STATE_FAILED
    # a's first step ran once; b's steps never ran again.
    assert [c["path"] for c in hook.calls] == ["/notify"]


async def test_an_event_on_the_bus_starts_its_runbook_once(
    start_mesh: StartMesh,
    mint_token: MintToken,
    hook: Hook,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        "roles:\n  - {name: autoops-events, permissions: [events.topics.subscribe, events.deliveries.ack]}\n"
        'bindings:\n  - {name: autoops-events, role: autoops-events, subjects: [{kind: user, name: "system:mesh"}]}\n'
    )
    monkeypatch.setenv("AUTOECOOPS_AUTH_SEED_FILE", str(seed))
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "off")
    mesh = await start_mesh(["auth-service", "policy-audit", "event-bus", "autoops"], secure=True)
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))
    rb = webhook_runbook(hook.url)
    rb.target = ""
    rb.trigger.event.CopyFrom(
        pb.EventTrigger(event_type="autoecoops.infra.sync.failed", topic="infra.sync")
    )
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="on-sync-failure", runbook=rb), metadata=md
    )
    await asyncio.sleep(1.0)  # the platform subscribes

    bus = events_pb2_grpc.EventBusServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("event-bus"))
    )
    for key, type_ in (
        ("op-1", "autoecoops.infra.sync.started"),
        ("op-1", "autoecoops.infra.sync.failed"),
    ):
        env = envelope_pb2.Envelope(
            source="//autoecoops/kernel/infra-manager",
            type=type_,
            subject="web",
            idempotency_key=f"{key}-{type_}",
        )
        payload = (
            infra_events.SyncFailed(application="web", operation_id=key)
            if type_.endswith("failed")
            else infra_events.SyncStarted(application="web", operation_id=key)
        )
        env.data.Pack(payload)
        await bus.Publish(events_pb2.PublishRequest(topic="infra.sync", envelope=env), metadata=md)

    async def started() -> list[pb.Remediation]:
        got = await stub.ListRemediations(
            pb.ListRemediationsRequest(runbook="runbooks/on-sync-failure"), metadata=md
        )
        return list(got.remediations)

    for _ in range(100):
        rems = await started()
        if rems:
            break
        await asyncio.sleep(0.1)
    (rem,) = rems  # the started event matched nothing
    assert (
        rem.event_id
        and rem.target == "web"
        and rem.reason.startswith("event autoecoops.infra.sync.failed")
    )
    done = await settled(stub, md, rem.name)
    assert done.state == pb.REMEDIATION_STATE_SUCCEEDED
    assert [c["path"] for c in hook.calls] == ["/notify"]


async def test_alerts_start_runbooks_by_label_and_safeguards_limit_blast_radius_and_concurrency(
    start_mesh: StartMesh, mint_token: MintToken, hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "off")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_MAX_CONCURRENT", "1")
    mesh = await start_mesh(["auth-service", "policy-audit", "event-bus", "autoops"], secure=True)
    stub, md = autoops(mesh), bearer(mint_token("alice", ["admin"]))

    # Blast radius: a workload of an application infra-manager does not know counts as
    # its only one, so 100 % of it would be in remediation, over the 50 % limit.
    narrow = webhook_runbook(hook.url, max_blast_radius_percent=50)
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="narrow", runbook=narrow), metadata=md
    )
    held = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/narrow", reason="x", target="web/Deployment/api"),
            metadata=md,
        )
    ).remediation
    assert held.state == pb.REMEDIATION_STATE_SKIPPED and held.message.startswith("blast radius")

    # A label-selected runbook starts on the SLO's page; a slow webhook holds the one slot.
    hook.delay = 1.5
    by_label = webhook_runbook(hook.url)
    by_label.target = ""
    by_label.trigger.label_selector.match_labels["team"] = "payments"
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="by-label", runbook=by_label), metadata=md
    )
    slo = pb.Slo(
        service="checkout",
        objective=0.999,
        labels={"team": "payments"},
        indicator=pb.Indicator(source=pb.SLI_SOURCE_PUSHED),
    )
    await stub.CreateSlo(pb.CreateSloRequest(slo_id="checkout", slo=slo), metadata=md)
    now = time.time()
    samples = [
        pb.SliSample(good_count=900, total_count=1000, time=_at(now - 60 * i)) for i in range(30)
    ]
    await stub.RecordSli(pb.RecordSliRequest(slo="slos/checkout", samples=samples), metadata=md)
    fired = await stub.EvaluateSlos(pb.EvaluateSlosRequest(), metadata=md)
    assert fired.changed_alerts
    got = (
        await stub.ListRemediations(
            pb.ListRemediationsRequest(runbook="runbooks/by-label"), metadata=md
        )
    ).remediations
    # One remediation per firing row, all on the SLO's service; one runs, the rest queue.
    assert len(got) == len(fired.changed_alerts)
    assert {r.target for r in got} == {"checkout"} and {r.alert for r in got} == {
        a.name for a in fired.changed_alerts
    }
    # Watch them all to the end: never more than one RUNNING at once, the rest queued.
    most_running, saw_queue = 0, False
    ended = {pb.REMEDIATION_STATE_SUCCEEDED, pb.REMEDIATION_STATE_FAILED}
    for _ in range(400):
        states = [
            (
                await stub.GetRemediation(pb.GetRemediationRequest(name=r.name), metadata=md)
            ).remediation.state
            for r in got
        ]
        running = states.count(pb.REMEDIATION_STATE_RUNNING)
        most_running = max(most_running, running)
        saw_queue = saw_queue or (running == 1 and pb.REMEDIATION_STATE_PENDING in states)
        if all(s in ended for s in states):
            break
        await asyncio.sleep(0.05)
    assert most_running == 1 and saw_queue
    assert states == [pb.REMEDIATION_STATE_SUCCEEDED] * len(got)
    assert len(hook.calls) == len(got)


def _at(seconds: float) -> Any:
    from google.protobuf import timestamp_pb2

    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t
