"""machine-ops's events on the event-bus and the identities of nodes in auth-service.

Events are their proto message in a CloudEvents-shaped envelope, published
with event-bus's Publish through the client factory; the idempotency key
comes from what caused the event (node, agent epoch, sequence), so a resent
agent message or a retried publish is stored once. Evaluations are already
recorded when their events go out, so a publish that keeps failing is
logged and counted, not allowed to undo them.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf import message, timestamp_pb2

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.common.v1 import options_pb2
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.clients import ClientFactory, remaining_timeout
from autoecoops.kernel.mesh.errors import NotFound, from_rpc_error

log = logging.getLogger("autoecoops.machine_ops")
SOURCE = "//autoecoops/platforms/machine-ops"
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
#: The role an enrolled node's identity carries (auth's built-in role).
AGENT_ROLE = "machineops-agent"


class BusPublisher:
    """Publishes machine-ops events through event-bus's Publish."""

    def __init__(self, clients: ClientFactory, *, timeout: float = 5.0, attempts: int = 3) -> None:
        self._clients = clients
        self._timeout = timeout
        self._attempts = attempts
        #: Events given up on since start (also logged).
        self.failures = 0

    async def publish(self, payload: message.Message, *, subject: str, key: str) -> bool:
        """Publish one event about ``subject`` (a resource name); False when it could not be."""
        spec = payload.DESCRIPTOR.GetOptions().Extensions[options_pb2.event]
        env = envelope_pb2.Envelope(
            source=SOURCE,
            type=spec.type,
            subject=subject,
            resource=f"machineops/{subject}",
            idempotency_key=key,
            data_content_type="application/protobuf",
        )
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        env.time.CopyFrom(now)
        env.data.Pack(payload)
        stub = self._clients.stub(events_pb2_grpc.EventBusServiceStub, "event-bus")
        request = events_pb2.PublishRequest(topic=spec.topic, envelope=env)
        delay = 0.1
        for attempt in range(1, self._attempts + 1):
            try:
                await stub.Publish(request, timeout=remaining_timeout(self._timeout))
                return True
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt == self._attempts:
                    self.failures += 1
                    log.warning(
                        "could not publish %s for %s: %s %s",
                        spec.type,
                        subject,
                        err.code().name,
                        err.details(),
                    )
                    return False
            await asyncio.sleep(delay)  # same idempotency key: stored once
            delay *= 4
        return False


class NodeIdentities:
    """Node identities as auth-service service accounts: the agent gets client
    credentials once and renews its short-lived tokens with IssueToken."""

    def __init__(self, clients: ClientFactory, timeout: float = 10.0) -> None:
        self._clients = clients
        self._timeout = timeout

    @staticmethod
    def account_of(node_id: str) -> str:
        """The service account (and token subject) of a node."""
        return f"node.{node_id}"

    async def create(self, node_id: str) -> tuple[str, str]:
        """A fresh identity for ``node_id`` (replacing any previous one): (client id, secret)."""
        stub = self._clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
        name = self.account_of(node_id)
        await self.delete(node_id)
        try:
            reply = await stub.CreateServiceAccount(
                auth_pb2.CreateServiceAccountRequest(
                    service_account=auth_pb2.ServiceAccount(
                        name=name,
                        roles=[AGENT_ROLE],
                        description=f"machine-ops agent of nodes/{node_id}",
                    )
                ),
                timeout=remaining_timeout(self._timeout),
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return reply.service_account.name, reply.client_secret

    async def delete(self, node_id: str) -> None:
        """Delete a node's identity (absent is fine)."""
        stub = self._clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
        try:
            await stub.DeleteServiceAccount(
                auth_pb2.DeleteServiceAccountRequest(name=self.account_of(node_id)),
                timeout=remaining_timeout(self._timeout),
            )
        except grpc.aio.AioRpcError as err:
            error = from_rpc_error(err)
            if not isinstance(error, NotFound):
                raise error from None
