"""Every processing outcome (acked, retried, dead-lettered) to the audit trail.

The outcome is written to an outbox stream in the same Redis script that
settles the delivery (lua.py), so an outcome is never lost and never slows
an Ack down. A forwarder sends the outbox to policy-audit's AppendEntry and
deletes each record once it is appended; a request id derived from the
record makes a retried append return the original entry instead of a second
one. Switched on by ``AUTOECOOPS_EVENT_BUS_AUDIT=true``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import struct_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.event_bus.store import EventStore, redis_errors
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, InvalidArgument, from_rpc_error
from autoecoops.kernel.mesh.server import Runtime

log = logging.getLogger("autoecoops.event_bus")

GROUP = "audit-forwarder"
#: An outcome claimed by a forwarder that died is taken over after this long.
CLAIM_IDLE_MS = 60_000
_NAMESPACE = uuid.UUID("5d1f4b8e-7a57-4c43-9a0e-2f9b7f3b6a10")
_ACTIONS = {
    "acked": ("events.delivery.acked", audit_pb2.OUTCOME_SUCCESS),
    "retried": ("events.delivery.retried", audit_pb2.OUTCOME_FAILURE),
    "dead_lettered": ("events.delivery.dead_lettered", audit_pb2.OUTCOME_FAILURE),
}

#: Appends one entry: policy-audit's AppendEntry, in production.
Append = Callable[[audit_pb2.AppendEntryRequest], Awaitable[Any]]


def entry_for(record_id: str, f: Mapping[str, str]) -> audit_pb2.AppendEntryRequest:
    """The audit append for one outbox record."""
    action, outcome = _ACTIONS.get(
        f.get("o", ""), ("events.delivery.unknown", audit_pb2.OUTCOME_FAILURE)
    )
    topic, group, eid = f.get("topic", ""), f.get("group", ""), f.get("eid", "")
    details = struct_pb2.Struct()
    details.update(
        {
            "topic": topic,
            "group": group,
            "consumer": f.get("consumer", ""),
            "event_id": eid,
            "event_type": f.get("t", ""),
            "attempt": int(f.get("attempt", "0") or 0),
            "reason": f.get("reason", ""),
            "event_actor": f.get("a", ""),
        }
    )
    tp = f.get("tp", "")
    entry = audit_pb2.AuditEntry(
        type="event.processed",
        service="event-bus",
        actor=envelope_pb2.Actor(subject=f.get("by") or "event-bus"),
        action=action,
        resource=f"events/topics/{topic}/groups/{group}/events/{eid}",
        outcome=outcome,
        trace_id=tp.split("-")[1] if tp.count("-") == 3 else "",
        details=details,
    )
    if f.get("time"):
        entry.time.FromMilliseconds(int(f["time"]))
    request_id = str(uuid.uuid5(_NAMESPACE, record_id + "|" + action + "|" + eid))
    return audit_pb2.AppendEntryRequest(entry=entry, request_id=request_id)


class AuditForwarder:
    """Sends the outcome outbox to the audit trail, at least once, in order per replica."""

    def __init__(self, store: EventStore, append: Append, batch: int = 100) -> None:
        self.store = store
        self.append = append
        self.batch = batch
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._ready = False

    async def _ensure_group(self) -> None:
        if not self._ready:
            try:
                await self.store.redis.xgroup_create(self.store.outbox, GROUP, "0", mkstream=True)
            except Exception as err:
                if "BUSYGROUP" not in str(err):
                    raise
            self._ready = True

    async def forward_once(self) -> int:
        """Forward what is waiting (ours, stale, then new); the number appended."""
        r = self.store.redis
        async with redis_errors():
            await self._ensure_group()
            claimed: Any = await r.xautoclaim(
                self.store.outbox, GROUP, self.consumer, CLAIM_IDLE_MS, "0-0", count=self.batch
            )
            items = [e for e in claimed[1] if e and e[1]]
            if not items:
                got: Any = await r.xreadgroup(
                    GROUP, self.consumer, {self.store.outbox: ">"}, count=self.batch
                )
                items = got[0][1] if got else []
        done = 0
        for raw_id, raw in items:
            record_id = raw_id.decode()
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            try:
                await self.append(entry_for(record_id, fields))
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if not isinstance(error, InvalidArgument):
                    raise error from err
                # A record the trail rejects would block every later one.
                log.error("audit trail rejected outcome %s %s: %s", record_id, fields, error)
            async with redis_errors(), r.pipeline(transaction=True) as pipe:
                pipe.xack(self.store.outbox, GROUP, record_id)
                pipe.xdel(self.store.outbox, record_id)
                await pipe.execute()
            done += 1
        return done

    async def run(self, idle: float = 1.0) -> None:
        """Forward until cancelled; back off while policy-audit or Redis is down."""
        backoff = idle
        while True:
            try:
                n = await self.forward_once()
                backoff = idle
                if n == 0:
                    await asyncio.sleep(idle)
            except AutoEcoOpsError as err:
                log.warning("audit forwarding paused: %s (retry in %.0fs)", err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)


def policy_audit_append(runtime: Runtime) -> Append:
    """AppendEntry on policy-audit, through the mesh's client factory."""

    async def append(request: audit_pb2.AppendEntryRequest) -> Any:
        stub = runtime.clients.stub(audit_pb2_grpc.AuditServiceStub, "policy-audit")
        return await stub.AppendEntry(request, timeout=10.0)

    return append
