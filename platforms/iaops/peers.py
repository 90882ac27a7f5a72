"""IAOps's calls to the kernel: policy-audit, infra-manager and event-bus.

Every call goes through the mesh's one client factory, so it carries the
caller's remaining deadline, the trace context and a token. IAOps never
renders manifests, syncs or decides policy itself: infra-manager renders
and syncs, policy-audit decides and keeps the trail, event-bus carries the
events.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, message, struct_pb2

from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.infra_manager.events import envelope
from autoecoops.kernel.mesh.clients import ClientFactory, remaining_timeout
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, from_rpc_error
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger("autoecoops.iaops")
SOURCE = "//autoecoops/platforms/iaops"

#: Metadata carrying a token delegated by the caller (RFC 8693, IAOps in ``act``),
#: set once per request; calls that act for the user (reading their bundle,
#: rendering, syncing and rolling back their application, the deploy decision)
#: send it, so the kernel checks the user's rights, not IAOps's own.
acting_for: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("acting_for", default=())


def _raise(err: grpc.aio.AioRpcError) -> AutoEcoOpsError:
    """The peer's status as our own exception, details kept (one error tree)."""
    return from_rpc_error(err)


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy decision: allow, reasons, and its id in the decision log."""

    allow: bool
    reasons: tuple[str, ...]
    decision_id: str
    defined: bool = True


class PolicyPeer:
    """policy-audit's PolicyService."""

    def __init__(self, clients: ClientFactory, timeout: float = 10.0) -> None:
        self._clients = clients
        self._timeout = timeout

    def _stub(self) -> policy_pb2_grpc.PolicyServiceStub:
        return self._clients.stub(policy_pb2_grpc.PolicyServiceStub, "policy-audit")

    async def evaluate(
        self, path: str, input: Mapping[str, Any], metadata: Sequence[tuple[str, str]] = ()
    ) -> tuple[Any, str]:
        """(value at ``path``, decision id); the value is None when undefined.

        ``metadata`` carries a delegated token when the decision is about the
        caller (policy-audit puts the verified identity in ``input.identity``).
        """
        value = struct_pb2.Value()
        json_format.ParseDict(_jsonable(input), value)
        try:
            reply = await self._stub().Evaluate(
                policy_pb2.EvaluateRequest(path=path, input=value),
                timeout=remaining_timeout(self._timeout),
                metadata=list(metadata) or None,
            )
        except grpc.aio.AioRpcError as err:
            raise _raise(err) from None
        result = json_format.MessageToDict(reply.result) if reply.HasField("result") else None
        return result, reply.decision_id

    async def decide(
        self, path: str, input: Mapping[str, Any], metadata: Sequence[tuple[str, str]] = ()
    ) -> Decision:
        """A ``{"allow", "reasons"}`` decision; undefined means deny."""
        result, decision_id = await self.evaluate(path, input, metadata)
        if not isinstance(result, Mapping):
            return Decision(False, (f"the policy {path} is undefined",), decision_id, False)
        reasons = result.get("reasons") or []
        return Decision(
            result.get("allow") is True, tuple(str(r) for r in reasons), decision_id, True
        )

    async def bundle(self, name: str) -> policy_pb2.Bundle:
        """A bundle by name (NOT_FOUND as policy-audit says it)."""
        try:
            reply = await self._stub().GetBundle(
                policy_pb2.GetBundleRequest(name=name),
                timeout=remaining_timeout(self._timeout),
                metadata=list(acting_for.get()) or None,
            )
        except grpc.aio.AioRpcError as err:
            raise _raise(err) from None
        bundle: policy_pb2.Bundle = reply.bundle
        return bundle


def _jsonable(value: Any) -> Any:
    """YAML values as JSON: dates and other scalars become strings, keys strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class InfraPeer:
    """infra-manager's InfraService."""

    def __init__(self, clients: ClientFactory, timeout: float = 60.0) -> None:
        self._clients = clients
        self._timeout = timeout

    def _stub(self) -> infra_pb2_grpc.InfraServiceStub:
        return self._clients.stub(infra_pb2_grpc.InfraServiceStub, "infra-manager")

    async def _call(self, method: str, request: message.Message) -> Any:
        try:
            return await getattr(self._stub(), method)(
                request,
                timeout=remaining_timeout(self._timeout),
                metadata=list(acting_for.get()) or None,
            )
        except grpc.aio.AioRpcError as err:
            raise _raise(err) from None

    async def manifests(self, name: str, revision: str) -> infra_pb2.GetManifestsResponse:
        """The application's manifests rendered at ``revision``."""
        reply: infra_pb2.GetManifestsResponse = await self._call(
            "GetManifests", infra_pb2.GetManifestsRequest(name=name, revision=revision)
        )
        return reply

    async def application(self, name: str) -> infra_pb2.Application:
        """The application with its status."""
        reply = await self._call("GetApplication", infra_pb2.GetApplicationRequest(name=name))
        return reply.application  # type: ignore[no-any-return]

    async def refresh(self, name: str) -> infra_pb2.Application:
        """Compare live state with Git now; the application with fresh health."""
        reply = await self._call(
            "RefreshApplication", infra_pb2.RefreshApplicationRequest(name=name)
        )
        return reply.application  # type: ignore[no-any-return]

    async def sync(self, name: str, revision: str) -> infra_pb2.OperationState:
        """Start a sync to ``revision``."""
        reply = await self._call(
            "SyncApplication", infra_pb2.SyncApplicationRequest(name=name, revision=revision)
        )
        return reply.operation  # type: ignore[no-any-return]

    async def history(self, name: str) -> list[infra_pb2.HistoryEntry]:
        """The application's deployment history, newest first."""
        reply = await self._call(
            "ListApplicationHistory",
            infra_pb2.ListApplicationHistoryRequest(name=name, page_size=50),
        )
        return list(reply.entries)

    async def rollback(self, name: str, history_id: int) -> infra_pb2.OperationState:
        """Roll back to a history entry (turning auto-sync off, so it sticks)."""
        reply = await self._call(
            "RollbackApplication",
            infra_pb2.RollbackApplicationRequest(
                name=name, history_id=history_id, disable_auto_sync=True
            ),
        )
        return reply.operation  # type: ignore[no-any-return]


class EventPeer:
    """Publishes IAOps events on event-bus (the infra-manager envelope, our source)."""

    def __init__(self, clients: ClientFactory, timeout: float = 5.0) -> None:
        self._clients = clients
        self._timeout = timeout
        #: Events given up on since start (also in the log).
        self.failures = 0

    async def publish(
        self, payload: message.Message, *, subject: str, resource: str, key: str
    ) -> bool:
        """Publish one event; False (logged) when the bus refused it or is unreachable.

        The deployment or verification has happened when its event is sent,
        so a lost event does not undo it; it is logged and counted.
        """
        from autoecoops.events.v1 import events_pb2, events_pb2_grpc

        topic, env = envelope(payload, app=subject, key=key)
        env.source = SOURCE
        env.resource = resource
        stub = self._clients.stub(events_pb2_grpc.EventBusServiceStub, "event-bus")
        try:
            await stub.Publish(
                events_pb2.PublishRequest(topic=topic, envelope=env),
                timeout=remaining_timeout(self._timeout),
            )
            return True
        except grpc.aio.AioRpcError as err:
            self.failures += 1
            log.warning(
                "could not publish %s for %s: %s %s",
                env.type,
                subject,
                err.code().name,
                err.details(),
            )
            return False
