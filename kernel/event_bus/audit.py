"""Every processing outcome (acked, retried, dead-lettered) to the audit trail.

The outcome is written to an outbox stream in the same Redis script that
settles the delivery (lua.py), so an outcome is never lost and never slows
an Ack down. The stream is one more outbox of the process's audit relay
(kernel/mesh/outbox.py): it appends the records to policy-audit's log in
order and deletes each once appended; a request id derived from the record
makes a retried append return the original entry instead of a second one.
Switched on by ``AUTOECOOPS_EVENT_BUS_AUDIT=true`` (the default).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from google.protobuf import struct_pb2

from autoecoops.audit.v1 import audit_pb2
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.event_bus.store import EventStore, TopicKeys
from autoecoops.kernel.mesh.audit import AuditTrail
from autoecoops.kernel.mesh.outbox import Outbox
from autoecoops.kernel.mesh.server import Runtime

#: Outcome records per append: nobody waits on them, and small groups keep the
#: calls that do wait (an Ack's own entry) from queueing behind them.
OUTCOME_BATCH = 50
_NAMESPACE = uuid.UUID("5d1f4b8e-7a57-4c43-9a0e-2f9b7f3b6a10")
_ACTIONS = {
    "acked": ("events.delivery.acked", audit_pb2.OUTCOME_SUCCESS),
    "retried": ("events.delivery.retried", audit_pb2.OUTCOME_FAILURE),
    "dead_lettered": ("events.delivery.dead_lettered", audit_pb2.OUTCOME_FAILURE),
}


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


def decode_outcome(record_id: str, raw: Mapping[bytes, bytes]) -> audit_pb2.AppendEntryRequest:
    """The append of one outcome record as the relay reads it from the stream."""
    return entry_for(record_id, {k.decode(): v.decode() for k, v in raw.items()})


def relay_outcomes(runtime: Runtime, store: EventStore) -> Outbox | None:
    """Give the outcome stream to this process's audit relay (None without one),
    and the outcome stream of each partition with outboxes of its own as it
    comes into use (each drained in its own order: a partition's outcomes are
    one sequence, partitions are independent)."""
    trail = runtime.auditor
    if not isinstance(trail, AuditTrail):
        return None
    relay = trail.relay

    def drain(keys: TopicKeys) -> None:
        if keys.outcomes:
            Outbox(store.redis, keys.outcomes, relay, decode=decode_outcome, batch=OUTCOME_BATCH)
            relay.start()

    store.on_partition = drain
    box = Outbox(store.redis, store.outbox, relay, decode=decode_outcome, batch=OUTCOME_BATCH)
    relay.start()
    return box
