"""autoops's calls into the kernel: events, audit, decisions, context and infra-manager.

The platform never re-implements a kernel service: every alert event goes
through event-bus, every audit entry through policy-audit's trail, every
approval question through a policy-audit Rego decision, context through
memory-hub, and every remediation action through infra-manager, all with
the one client factory (deadline, trace and identity propagated). A call
made for a user carries an on-behalf-of token; automated runs carry the
platform's own identity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import grpc
import httpx
from google.protobuf import json_format, message, struct_pb2, timestamp_pb2
from opentelemetry import trace

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.common.v1 import options_pb2
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.mesh.audit import FAILURE, SUCCESS, ServiceTrail
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.clients import ClientFactory, remaining_timeout
from autoecoops.kernel.mesh.context import MemoryContext
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, FailedPrecondition, from_rpc_error
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger("autoecoops.autoops")
SOURCE = "//autoecoops/platforms/autoops"
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
__all__ = ["FAILURE", "SUCCESS", "Kernel"]


def _traceparent() -> str:
    """The W3C traceparent of the current span ('' outside a trace)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class Kernel:
    """The platform's one door to the kernel services."""

    def __init__(
        self,
        clients: ClientFactory,
        trail: ServiceTrail,
        *,
        publish_events: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self._clients = clients
        # The process's audit trail: records go through autoops's outbox and relay.
        self.trail = trail
        self._publish = publish_events
        self._timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout)
        self._memory = MemoryContext(clients, "autoops", timeout=timeout)

    async def close(self) -> None:
        """Close the webhook HTTP pool."""
        await self._http.aclose()

    async def _metadata(self, principal: Principal | None, audience: str) -> list[tuple[str, str]]:
        """On-behalf-of metadata for ``principal`` (none: the platform's own token)."""
        source = self._clients.token_source
        obo = getattr(source, "on_behalf_of", None)
        if principal is None or not principal.token or obo is None:
            return []
        try:
            got: list[tuple[str, str]] = await obo(principal, audience)
            return got
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def _call(
        self, rpc: Any, request: message.Message, metadata: list[tuple[str, str]]
    ) -> Any:
        delay = 0.1
        for attempt in range(1, 4):
            try:
                return await rpc(
                    request, timeout=remaining_timeout(self._timeout), metadata=metadata or None
                )
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt == 3:
                    raise from_rpc_error(err) from None
            await asyncio.sleep(delay)
            delay *= 4
        raise AssertionError("unreachable")

    # -- events ---------------------------------------------------------------

    async def publish(
        self, payload: message.Message, *, subject: str, resource: str, key: str
    ) -> bool:
        """Publish one event; False (logged) when the bus would not take it."""
        if not self._publish:
            return False
        spec = payload.DESCRIPTOR.GetOptions().Extensions[options_pb2.event]
        env = envelope_pb2.Envelope(
            source=SOURCE,
            type=spec.type,
            subject=subject,
            resource=resource,
            idempotency_key=key,
            data_content_type="application/protobuf",
            trace_parent=_traceparent(),
        )
        env.time.CopyFrom(now_ts())
        env.data.Pack(payload)
        stub = self._clients.stub(events_pb2_grpc.EventBusServiceStub, "event-bus")
        try:
            await self._call(
                stub.Publish, events_pb2.PublishRequest(topic=spec.topic, envelope=env), []
            )
            return True
        except AutoEcoOpsError as err:
            log.warning("could not publish %s about %s: %s", spec.type, subject, err.message)
            return False

    # -- audit ----------------------------------------------------------------

    async def audit(
        self,
        action: str,
        resource: str,
        *,
        outcome: int = SUCCESS,
        details: Mapping[str, Any] | None = None,
        actor: Principal | None = None,
        decision_id: str = "",
    ) -> int:
        """One audit entry of a platform decision (raises Unavailable when it cannot be stored)."""
        return await self.trail.record(
            type="autoops",
            action=action,
            resource=resource,
            outcome=outcome,
            details=details,
            actor=actor if actor is not None else Principal(subject="system:autoops"),
            decision_id=decision_id,
        )

    # -- policy ---------------------------------------------------------------

    async def decide(self, path: str, document: Mapping[str, Any]) -> tuple[Any, str, bool]:
        """(result, decision id, defined) of a policy-audit decision."""
        stub = self._clients.stub(policy_pb2_grpc.PolicyServiceStub, "policy-audit")
        value = struct_pb2.Value()
        value.struct_value.update(dict(document))
        reply = await self._call(
            stub.Evaluate, policy_pb2.EvaluateRequest(path=path, input=value), []
        )
        result = json_format.MessageToDict(reply.result) if reply.defined else None
        return result, reply.decision_id, bool(reply.defined)

    # -- memory-hub -----------------------------------------------------------

    async def context(self, namespace: str, query: str, k: int = 3) -> list[pb.ContextCitation]:
        """The most relevant runbooks and incident notes, with citations ([] when unavailable)."""
        return [
            pb.ContextCitation(
                document_id=c.document_id,
                title=c.title,
                source=c.source,
                snippet=c.snippet,
                score=c.score,
            )
            for c in await self._memory.search(namespace, query, k)
        ]

    # -- infra-manager --------------------------------------------------------

    def _infra(self) -> infra_pb2_grpc.InfraServiceStub:
        return self._clients.stub(infra_pb2_grpc.InfraServiceStub, "infra-manager")

    async def application(
        self, name: str, principal: Principal | None = None
    ) -> infra_pb2.Application:
        """An infra-manager application with its status."""
        md = await self._metadata(principal, "infra-manager")
        reply = await self._call(
            self._infra().GetApplication, infra_pb2.GetApplicationRequest(name=name), md
        )
        app: infra_pb2.Application = reply.application
        return app

    async def sync(
        self,
        name: str,
        *,
        revision: str = "",
        prune: bool = False,
        principal: Principal | None = None,
    ) -> infra_pb2.OperationState:
        """Start a sync of ``name``."""
        md = await self._metadata(principal, "infra-manager")
        req = infra_pb2.SyncApplicationRequest(name=name, revision=revision, prune=prune)
        reply = await self._call(self._infra().SyncApplication, req, md)
        op: infra_pb2.OperationState = reply.operation
        return op

    async def rollback(
        self, name: str, history_id: int = 0, principal: Principal | None = None
    ) -> infra_pb2.OperationState:
        """Roll ``name`` back to ``history_id`` (default: the entry before the current one)."""
        md = await self._metadata(principal, "infra-manager")
        if not history_id:
            hist = await self._call(
                self._infra().ListApplicationHistory,
                infra_pb2.ListApplicationHistoryRequest(name=name, page_size=50),
                md,
            )
            entries = sorted(hist.entries, key=lambda e: e.id, reverse=True)
            app = await self.application(name, principal)
            current = app.status.sync.revision
            older = [e for e in entries if e.revision != current]
            if not older:
                raise FailedPrecondition(
                    f"application {name} has no earlier revision to roll back to",
                    reason="NOTHING_TO_ROLL_BACK",
                )
            history_id = older[0].id
        req = infra_pb2.RollbackApplicationRequest(name=name, history_id=history_id)
        reply = await self._call(self._infra().RollbackApplication, req, md)
        op: infra_pb2.OperationState = reply.operation
        op_out = infra_pb2.OperationState()
        op_out.CopyFrom(op)
        op_out.rollback_history_id = history_id
        return op_out

    # -- webhooks -------------------------------------------------------------

    async def webhook(self, url: str, body: Mapping[str, Any]) -> int:
        """POST ``body`` as JSON; the HTTP status (FAILED_PRECONDITION when unreachable)."""
        try:
            reply = await self._http.post(
                url,
                json=dict(body),
                headers={"traceparent": _traceparent()} if current_trace_id() else None,
            )
        except httpx.HTTPError as err:
            raise FailedPrecondition(
                f"webhook {url} failed: {err}", reason="WEBHOOK_FAILED"
            ) from None
        return reply.status_code


def now_ts() -> timestamp_pb2.Timestamp:
    """The current time as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts
