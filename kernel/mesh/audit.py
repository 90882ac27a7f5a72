"""The one way a service writes to the audit trail: through its outbox (outbox.py).

Every audited RPC (method option ``audited``) gets an ``AuditContext`` from
``AuditTrail.begin`` before its handler runs: the entry (actor, W3C trace
id, action, resource, service) and a request id. The service's store adds
that record to the same Redis transaction as the change (``Outbox.script``
or ``Outbox.execute``); the process's ``Relay`` appends it to policy-audit's
log; ``finish`` answers once it is there. The rule, in full, is in
docs/policy-audit.md ("The audit rule"):

- the log unreachable before the handler runs: ``UNAVAILABLE``
  (``AUDIT_LOG_UNAVAILABLE``, ``committed: "false"``), nothing changed;
- the change committed: OK once its entry is appended (the index is in the
  ``autoecoops-audit-index`` trailer), or, when the deadline comes first,
  ``DEADLINE_EXCEEDED`` (``AUDIT_APPEND_PENDING``) with ``committed: "true"``;
  every error after a commit carries ``committed: "true"``;
- the write of the change sent but its reply lost (Redis stopped as it ran
  it): ``committed: "unknown"``, as it may have committed;
- the handler failed before changing anything: its error, and a FAILURE
  (or DENIED) entry through the outbox, never a SUCCESS one.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message, struct_pb2, timestamp_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.mesh.auth import Principal, current_principal
from autoecoops.kernel.mesh.config import DOMAIN_SERVICE
from autoecoops.kernel.mesh.descriptors import MethodInfo, field_value
from autoecoops.kernel.mesh.errors import (
    AlreadyExists,
    AutoEcoOpsError,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from autoecoops.kernel.mesh.interceptors import current_deadline, current_trace_id
from autoecoops.kernel.mesh.outbox import (
    AuditContext,
    LogRejected,
    Outbox,
    Relay,
    current_audit,
    current_records,
)

if TYPE_CHECKING:
    from autoecoops.kernel.mesh.server import Runtime

log = logging.getLogger("autoecoops.mesh.audit")
SUCCESS = audit_pb2.OUTCOME_SUCCESS
FAILURE = audit_pb2.OUTCOME_FAILURE
DENIED = audit_pb2.OUTCOME_DENIED

#: Trailing metadata of an audited call that succeeded: its entry's log index.
INDEX_TRAILER = "autoecoops-audit-index"
#: Trailing metadata: the audit request id of the call (find its entry with it).
REQUEST_ID_TRAILER = "autoecoops-audit-request-id"
#: How long an audited call with no deadline waits for its entry.
DEFAULT_WAIT = 30.0
#: How long a call waits at most for a fresh look at a log last seen unreachable:
#: gRPC's reconnect backoff (at most 1 s from the client factory) plus its jitter.
#: During a real outage a call is refused after this long at most.
PROBE_WAIT = 1.5
#: How long a refused or failed call waits for its FAILURE/DENIED entry at most.
FAILURE_WAIT = 1.0
_NAMESPACE = uuid.UUID("0f2d8c1e-3b7a-4d5e-9c61-7a0b5e4f2d13")


def actor_of(principal: Principal | None) -> envelope_pb2.Actor:
    """The audit/event Actor of a principal (empty for none)."""
    if principal is None:
        return envelope_pb2.Actor()
    return envelope_pb2.Actor(
        subject=principal.subject, issuer=principal.issuer, actors=list(principal.actors)
    )


def build_request(
    *,
    type: str,
    service: str,
    action: str,
    resource: str = "",
    outcome: int = SUCCESS,
    details: Mapping[str, Any] | None = None,
    actor: Principal | None = None,
    decision_id: str = "",
    request_id: str = "",
    trace_id: str | None = None,
) -> audit_pb2.AppendEntryRequest:
    """An append for one entry (time set now; the actor and trace id of the current call by default)."""
    entry = audit_pb2.AuditEntry(
        type=type,
        service=service,
        actor=actor_of(actor if actor is not None else current_principal.get()),
        action=action,
        resource=resource,
        outcome=outcome,  # type: ignore[arg-type]
        trace_id=current_trace_id() if trace_id is None else trace_id,
        decision_id=decision_id,
    )
    entry.time.CopyFrom(_now())
    if details:
        entry.details.CopyFrom(_struct(details))
    return audit_pb2.AppendEntryRequest(entry=entry, request_id=request_id or uuid.uuid4().hex)


class AuditTrail:
    """A process's audit writer: one outbox per service, one relay for all of them."""

    def __init__(self, runtime: Runtime, service: str, *, timeout: float = 10.0) -> None:
        self._runtime = runtime
        self._service = service
        self._timeout = timeout
        self._outboxes: dict[str, Outbox] = {}
        self._local: Any = None
        self._bus: Any = None
        self.relay = Relay(self._append, probe=self._probe, publish=self._publish)
        runtime.closers.insert(0, self.close)

    # -- wiring -------------------------------------------------------------

    def outbox(self, service: str) -> Outbox:
        """``service``'s outbox (``autoecoops:<service>:outbox``), drained by this process."""
        box = self._outboxes.get(service)
        if box is None:
            box = Outbox(self._runtime.redis, self._runtime.key(service, "outbox"), self.relay)
            self._outboxes[service] = box
            with contextlib.suppress(RuntimeError):  # no loop yet: it starts with the first record
                self.relay.start()  # append what an earlier run left behind
        return box

    def use_local(self, append_many: Any) -> None:
        """Append in-process (policy-audit's own log) instead of over gRPC."""
        self._local = append_many

    async def _append(self, requests: Sequence[audit_pb2.AppendEntryRequest]) -> list[int]:
        if self._local is not None:
            try:
                got = await self._local([(r.entry, r.request_id) for r in requests])
            except InvalidArgument as err:
                raise LogRejected(err.message, err.reason, err.metadata) from None
            return [a.index for a in got]
        stub = self._runtime.clients.stub(audit_pb2_grpc.AuditServiceStub, "policy-audit")
        try:
            reply = await stub.BatchAppendEntries(
                audit_pb2.BatchAppendEntriesRequest(requests=list(requests)),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            cause = from_rpc_error(err)
            if isinstance(cause, InvalidArgument):
                raise LogRejected(cause.message, cause.reason, cause.metadata) from None
            raise cause from None
        return [e.index for e in reply.entries]

    async def _probe(self, within: float) -> None:
        """An empty append that waits for a connection: is the log there now?"""
        if self._local is not None:
            return
        stub = self._runtime.clients.stub(audit_pb2_grpc.AuditServiceStub, "policy-audit")
        await stub.BatchAppendEntries(
            audit_pb2.BatchAppendEntriesRequest(), timeout=within, wait_for_ready=True
        )

    async def _publish(self, topic: str, envelopes: Sequence[envelope_pb2.Envelope]) -> None:
        """Store events on event-bus's streams, as its Publish does (same validation and
        dedup), without a second audited call: the change they report is audited already."""
        if self._bus is None:
            # Imported here: event-bus is a service built on this runtime, not part of it.
            from autoecoops.kernel.event_bus.bus import EventBus
            from autoecoops.kernel.event_bus.envelope import PublishContext
            from autoecoops.kernel.event_bus.settings import EventBusSettings
            from autoecoops.kernel.event_bus.store import EventStore

            # A bus of its own without an outbox: this process publishes, it
            # does not drain event-bus's outbox (that is event-bus's relay's).
            settings = EventBusSettings.from_env()
            config = self._runtime.config
            store = EventStore(
                self._runtime.redis,
                self._runtime.key("events") + ":",
                settings,
                wait_replicas=config.wait_replicas,
                wait_timeout_ms=config.redis_wait_timeout_ms,
            )
            self._bus = (EventBus(store, settings), PublishContext)
        bus, context = self._bus
        step = max(1, bus.settings.max_batch)
        for at in range(0, len(envelopes), step):
            try:
                await bus.publish(
                    topic, list(envelopes[at : at + step]), context(principal=None, now=time.time())
                )
            except (InvalidArgument, AlreadyExists, PermissionDenied) as err:
                raise LogRejected(err.message) from None

    async def close(self) -> None:
        """Give the relay a moment to drain, then stop it (the rest stays in Redis)."""
        if self._outboxes and self.relay.reachable:
            # What is left stays in Redis for the next start; a log that is
            # already gone (policy-audit stops first in `autoecoops up`) is not waited for.
            await self.relay.flush(within=1.0, while_reachable=True)
        await self.relay.close()

    # -- CallAuditor: RPCs marked audited -------------------------------------

    async def begin(self, info: MethodInfo, request: message.Message | None) -> AuditContext:
        """The call's record, set as ``current_audit``; UNAVAILABLE when the log is unreachable."""
        if (
            not self.relay.reachable
            and not info.public
            # Half of what is left at most: a refusal must still reach the
            # caller inside its deadline, with its reason, not as its own timeout.
            and not await self.relay.recheck(min(PROBE_WAIT, self._left() / 2))
        ):
            raise Unavailable(
                f"{info.full_name} was not run: the audit log is unreachable "
                f"({self.relay.last_error}); nothing was changed",
                reason="AUDIT_LOG_UNAVAILABLE",
                metadata={"committed": "false"},
                retry_delay=1.0,
            )
        rid = field_value(request, "request_id") if request is not None else ""
        principal = current_principal.get()
        if rid:
            # A retry with the same request id (AIP-155) maps to the same
            # audit request id, so the log keeps one entry for the change.
            who = principal.subject if principal is not None else ""
            rid = str(uuid.uuid5(_NAMESPACE, f"{info.full_name}|{who}|{rid}"))
        ctx = AuditContext(
            build_request(
                type="rpc",
                service=_service_of(info),
                action=info.full_name,
                resource=resource_of(request, info.resource_field),
                actor=principal,
                request_id=rid,
            )
        )
        current_audit.set(ctx)
        return ctx

    async def finish(self, info: MethodInfo, ctx: AuditContext) -> int:
        """Wait for the call's entry (staging it first if no store did); its index."""
        if not ctx.staged:
            if ctx.observed:
                return -1  # the store ran and changed nothing (e.g. a duplicate): no entry
            # No store of this call commits through the outbox (a change
            # outside Redis, or none): its record is committed on its own.
            await self.outbox(_service_of(info) or self._service).stage(ctx)
        if info.public:
            # Token issuance: the log's own authorization (its RBAC watch)
            # needs a token, so it is neither refused nor held up by the log;
            # its record is committed (in Redis) before it answers.
            return -1
        index = await self._wait(ctx)
        if index is not None and not await self._settled():
            index = None
        if index is None:
            raise DeadlineExceeded(
                f"{info.full_name} committed its change, but the deadline ran out before its "
                "audit entry was appended; the entry will follow "
                f"(audit request id {ctx.request.request_id})",
                reason="AUDIT_APPEND_PENDING",
                metadata=self._committed(ctx),
            )
        return index

    async def failed(
        self,
        info: MethodInfo,
        request: message.Message | None,
        ctx: AuditContext | None,
        error: AutoEcoOpsError,
    ) -> AutoEcoOpsError:
        """The error to answer for an audited call that raised ``error``.

        After a commit: the error, once the entry is appended (or the deadline
        comes), with ``committed: "true"``. Before any: the error as it is,
        and a FAILURE/DENIED entry in the outbox (not waited for).
        """
        if ctx is not None and ctx.staged:
            await self._wait(ctx)
            error.metadata.update(self._committed(ctx))
            return error
        if ctx is not None and ctx.in_doubt:
            # The write of the change and its record was sent, and its reply
            # lost: Redis may have run it. Never a plain failure, and no
            # FAILURE entry (a SUCCESS one may be in the outbox).
            error.metadata.update(committed="unknown", audit_request_id=ctx.request.request_id)
            error.message += (
                "; the change may have been made (its reply from Redis was lost): "
                "a retry with the same request id (or idempotency key) tells which"
            )
            return error
        if isinstance(error, Unauthenticated) or error.reason in (
            "AUDIT_LOG_UNAVAILABLE",
            "AUDIT_APPEND_PENDING",
        ):
            return error
        if isinstance(error, Unavailable) and "committed" not in error.metadata:
            return error  # Redis or a dependency is down: nothing was changed, nothing to add
        principal = current_principal.get()
        if principal is None:
            return error
        outcome = DENIED if isinstance(error, PermissionDenied) else FAILURE
        req = build_request(
            type="rpc",
            service=_service_of(info),
            action=info.full_name,
            resource=resource_of(request, info.resource_field),
            outcome=outcome,
            details={"code": error.code.name, "reason": error.reason},
            actor=principal,
        )
        try:
            box = self.outbox(_service_of(info) or self._service)
            sid = await box.add(req)
            if self.relay.reachable:
                # Briefly: a client that reads the log after a refusal finds its
                # entry, but a refusal is never held up long by the log.
                await self.relay.wait(box, sid, min(FAILURE_WAIT, self._left()))
        except Exception:  # the error the caller gets matters more than this record
            log.warning("could not record the failure of %s", info.full_name, exc_info=True)
        return error

    async def settle(self, info: MethodInfo) -> None:
        """After a call that is not audited itself: wait for the entries it recorded."""
        if not await self._settled():
            raise DeadlineExceeded(
                f"{info.full_name} made its change, but the deadline ran out before the "
                "audit entries it recorded were appended; they will follow",
                reason="AUDIT_APPEND_PENDING",
                metadata={"committed": "true"},
            )

    async def _settled(self) -> bool:
        """True once every record of the call being served is in the log (False: deadline)."""
        for box, sid in list(current_records.get() or ()):
            if await self.relay.wait(box, sid, self._left()) is None:
                return False
        return True

    @staticmethod
    def _committed(ctx: AuditContext) -> dict[str, str]:
        return {"committed": "true", "audit_request_id": ctx.request.request_id}

    @staticmethod
    def _left() -> float:
        """How long this call may wait for the log."""
        deadline = current_deadline.get()
        if deadline is None:
            return DEFAULT_WAIT
        left = deadline - time.monotonic()
        # Answer a little before the caller's deadline, or the caller
        # sees its own bare DEADLINE_EXCEEDED instead of our details.
        return max(0.0, left - min(0.25, left * 0.2))

    async def _wait(self, ctx: AuditContext) -> int | None:
        assert ctx.outbox is not None
        return await self.relay.wait(ctx.outbox, ctx.staged_id, self._left())

    # -- entries that are not RPCs (infra-manager's operations, decisions) ----

    async def record(
        self,
        *,
        type: str,
        action: str,
        resource: str = "",
        outcome: int = SUCCESS,
        details: Mapping[str, Any] | None = None,
        actor: Principal | None = None,
        decision_id: str = "",
        service: str = "",
        request_id: str = "",
        wait: float = 0.0,
    ) -> int:
        """Commit one entry to the service's outbox (durable at once).

        The relay appends it; nothing is dropped while Redis keeps it. Returns
        its log index when appended within ``wait`` seconds, else -1.
        """
        req = build_request(
            type=type,
            service=service or self._service,
            action=action,
            resource=resource,
            outcome=outcome,
            details=details,
            actor=actor,
            decision_id=decision_id,
            request_id=request_id,
        )
        box = self.outbox(service or self._service)
        sid = await box.add(req)
        served = current_records.get()
        if served is not None:
            served.append((box, sid))  # the call being served answers once it is appended
        if wait <= 0:
            return -1
        index = await self.relay.wait(box, sid, wait)
        return -1 if index is None else index


class ServiceTrail:
    """The process's audit trail as one service writes to it (its name and outbox)."""

    def __init__(self, trail: AuditTrail, service: str) -> None:
        self.trail = trail
        self.service = service

    async def record(self, **fields: Any) -> int:
        """``AuditTrail.record`` with this service's name and outbox."""
        fields.setdefault("service", self.service)
        return await self.trail.record(**fields)


def trail_for(runtime: Runtime, service: str) -> ServiceTrail:
    """``service``'s view of the process's audit trail (a trail of its own for a bare runtime)."""
    trail = runtime.auditor
    if not isinstance(trail, AuditTrail):
        trail = AuditTrail(runtime, service)
    return ServiceTrail(trail, service)


def outbox_for(runtime: Runtime, service: str) -> Outbox:
    """The outbox ``service``'s store writes to: the process's, or an undrained one for a bare runtime."""
    trail = runtime.auditor
    if isinstance(trail, AuditTrail):
        return trail.outbox(service)
    return Outbox(runtime.redis, runtime.key(service, "outbox"))


def _service_of(info: MethodInfo) -> str:
    return DOMAIN_SERVICE.get(info.full_name.split(".")[1], "")


def resource_of(request: message.Message | None, resource_field: str = "") -> str:
    """What a request acts on: the method option's ``resource_field`` when it names
    one, else its ``name``, a sub-message's ``name``, or its namespace.

    Only names go to the trail, never request bodies (they may hold secrets).
    """
    if request is None:
        return ""
    if resource_field:
        value = field_value(request, resource_field)
        if value:
            return value
    fields = request.DESCRIPTOR.fields_by_name
    for key in ("name", "namespace", "topic"):
        if key in fields and isinstance(getattr(request, key), str) and getattr(request, key):
            return f"{key}/{getattr(request, key)}" if key != "name" else str(getattr(request, key))
    for field in request.DESCRIPTOR.fields:
        if (
            field.message_type is not None
            and not field.is_repeated
            and request.HasField(field.name)
        ):
            sub = getattr(request, field.name)
            if "name" in sub.DESCRIPTOR.fields_by_name and isinstance(sub.name, str) and sub.name:
                return f"{field.name}/{sub.name}"
    return ""


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _struct(details: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(details))
    return out
