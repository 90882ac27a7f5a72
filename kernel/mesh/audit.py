"""The one way a service writes to the audit trail: policy-audit's AppendEntry.

Appends are synchronous (OK means stored) and idempotent by ``request_id``,
so a retry after UNAVAILABLE cannot write an entry twice. When the trail
cannot be written, ``record`` raises ``Unavailable`` and the caller's request
fails: DESIGN.md's flow says an action that cannot be audited did not
happen as far as its caller knows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import message, struct_pb2, timestamp_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.mesh.auth import Principal, current_principal
from autoecoops.kernel.mesh.clients import ClientFactory, remaining_timeout
from autoecoops.kernel.mesh.config import DOMAIN_SERVICE
from autoecoops.kernel.mesh.descriptors import MethodInfo
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    PermissionDenied,
    Unavailable,
    from_rpc_error,
)
from autoecoops.kernel.mesh.interceptors import current_trace_id

SUCCESS = audit_pb2.OUTCOME_SUCCESS
FAILURE = audit_pb2.OUTCOME_FAILURE
DENIED = audit_pb2.OUTCOME_DENIED

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def actor_of(principal: Principal | None) -> envelope_pb2.Actor:
    """The audit/event Actor of a principal (empty for none)."""
    if principal is None:
        return envelope_pb2.Actor()
    return envelope_pb2.Actor(
        subject=principal.subject, issuer=principal.issuer, actors=list(principal.actors)
    )


class AuditTrail:
    """Appends entries for one service through the client factory."""

    def __init__(
        self, clients: ClientFactory, service: str, *, timeout: float = 5.0, attempts: int = 3
    ) -> None:
        self._clients = clients
        self._service = service
        self._timeout = timeout
        self._attempts = attempts

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
    ) -> int:
        """Append one entry and return its index; ``Unavailable`` if it cannot be stored."""
        entry = audit_pb2.AuditEntry(
            type=type,
            service=service or self._service,
            actor=actor_of(actor if actor is not None else current_principal.get()),
            action=action,
            resource=resource,
            outcome=outcome,  # type: ignore[arg-type]
            trace_id=current_trace_id(),
            decision_id=decision_id,
        )
        entry.time.CopyFrom(_now())
        if details:
            entry.details.CopyFrom(_struct(details))
        request = audit_pb2.AppendEntryRequest(entry=entry, request_id=uuid.uuid4().hex)
        stub = self._clients.stub(audit_pb2_grpc.AuditServiceStub, "policy-audit")
        delay = 0.05
        for attempt in range(1, self._attempts + 1):
            try:
                reply = await stub.AppendEntry(request, timeout=remaining_timeout(self._timeout))
                return int(reply.index)
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt == self._attempts:
                    cause = from_rpc_error(err)
                    raise Unavailable(
                        f"the audit trail could not record {action} on {resource or type}: {cause.message}",
                        reason="AUDIT_WRITE_FAILED",
                        retry_delay=1.0,
                    ) from None
            await asyncio.sleep(delay)  # same request_id: a retry never appends twice
            delay *= 4
        raise AssertionError("unreachable")

    # -- CallAuditor: the generic entry of RPCs marked audited ----------------

    async def call_succeeded(self, info: MethodInfo, request: message.Message | None) -> None:
        """Record a successful audited RPC (action = its full name)."""
        await self.record(
            type="rpc",
            action=info.full_name,
            resource=resource_of(request),
            outcome=SUCCESS,
            service=_service_of(info),
        )

    async def call_failed(
        self, info: MethodInfo, request: message.Message | None, error: AutoEcoOpsError
    ) -> None:
        """Record a denied or failed audited RPC."""
        outcome = DENIED if isinstance(error, PermissionDenied) else FAILURE
        await self.record(
            type="rpc",
            action=info.full_name,
            resource=resource_of(request),
            outcome=outcome,
            details={"code": error.code.name, "reason": error.reason},
            service=_service_of(info),
        )


def _service_of(info: MethodInfo) -> str:
    return DOMAIN_SERVICE.get(info.full_name.split(".")[1], "")


def resource_of(request: message.Message | None) -> str:
    """What a request acts on: its ``name``, a sub-message's ``name``, or its namespace.

    Only names go to the trail, never request bodies (they may hold secrets).
    """
    if request is None:
        return ""
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
