"""Agent sessions across replicas: which replica holds which agent's stream,
and how a command reaches it.

Each replica has an id, refreshes a liveness key, and listens on its own
Redis pub/sub channel. Opening a session records ``node -> replica`` in the
session registry. ``send`` (EvaluateNode, RemediateNode) looks the node up,
publishes the command on the holder's channel (the holder may be this
replica: the same path), and waits on a Redis list for the answer with
BLPOP and a timeout. The holder's session pushes the answer when the agent's
reply has been applied. So a command works whichever replica the caller and
the agent reached, and a replica that died stops holding sessions within
the liveness TTL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from autoecoops.kernel.mesh.errors import DeadlineExceeded, Unavailable
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.platforms.machine_ops.store import REPLICA_TTL, MachineStore

log = logging.getLogger("autoecoops.machine_ops.sessions")
REPLY_TTL = 120


@dataclass
class LocalSession:
    """One agent stream held by this replica."""

    node: str
    epoch: str
    outbox: asyncio.Queue[pb.AgentSessionResponse | None] = field(default_factory=asyncio.Queue)


class SessionHub:
    """This replica's sessions, and command routing to any replica's sessions."""

    def __init__(self, store: MachineStore) -> None:
        self.store = store
        self.replica = uuid.uuid4().hex[:12]
        self.local: dict[str, LocalSession] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        #: Heartbeats since the last flush: node -> time. Written in one HSET
        #: a second, so a heartbeat costs no Redis round trip of its own.
        self._seen: dict[str, float] = {}

    async def start(self) -> None:
        """Announce this replica and listen for commands."""
        await self.store.replica_alive(self.replica)
        self._pubsub = self.store.redis.pubsub()
        await self._pubsub.subscribe(self.store.channel(self.replica))
        self._tasks = [
            asyncio.create_task(self._listen(), name="machineops-commands"),
            asyncio.create_task(self._alive(), name="machineops-liveness"),
            asyncio.create_task(self._flush_seen(), name="machineops-last-seen"),
        ]

    async def stop(self) -> None:
        """Stop listening and end every local session."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for s in list(self.local.values()):
            s.outbox.put_nowait(None)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.store.redis.delete(self.store.k("replica", self.replica))

    async def _alive(self) -> None:
        while True:
            await asyncio.sleep(REPLICA_TTL / 3)
            try:
                await self.store.replica_alive(self.replica)
            except Exception:  # Redis down: sessions look offline until it is back
                log.warning("could not refresh replica liveness", exc_info=True)

    def heard(self, node: str) -> None:
        """Note that ``node``'s agent was heard from (flushed to Redis within a second)."""
        self._seen[node] = time.time()

    async def _flush_seen(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            batch, self._seen = self._seen, {}
            if batch:
                try:
                    await self.store.redis.hset(
                        self.store.k("seen"), mapping={n: repr(t) for n, t in batch.items()}
                    )
                except Exception:
                    log.warning("could not record last-seen times", exc_info=True)

    async def _listen(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception:
                log.warning("command channel failed; resubscribing", exc_info=True)
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await self._pubsub.subscribe(self.store.channel(self.replica))
                continue
            if msg is None:
                continue
            data = json.loads(msg["data"])
            command = pb.Command.FromString(base64.b64decode(data["command"]))
            session = self.local.get(data["node"])
            if session is None:
                await self.reply(command.id, {"error": "the agent's session ended"})
                continue
            session.outbox.put_nowait(pb.AgentSessionResponse(command=command))

    # -- sessions ----------------------------------------------------------------

    async def attach(self, node: str, epoch: str) -> LocalSession:
        """Hold ``node``'s session here (a newer session replaces an older one)."""
        old = self.local.get(node)
        if old is not None:
            old.outbox.put_nowait(None)
        session = LocalSession(node, epoch)
        self.local[node] = session
        await self.store.hold_session(node, self.replica)
        return session

    async def detach(self, session: LocalSession) -> None:
        """Release ``session`` unless a newer one took its place."""
        if self.local.get(session.node) is session:
            del self.local[session.node]
            with contextlib.suppress(Exception):
                await self.store.release_session(session.node, self.replica)

    # -- commands ---------------------------------------------------------------------

    async def send(self, node: str, command: pb.Command, wait: float) -> dict[str, Any]:
        """Deliver ``command`` to ``node``'s agent wherever its session is and wait for the answer."""
        holder = await self.store.session_of(node)
        if holder is None:
            raise Unavailable(
                f"nodes/{node} has no agent connected",
                reason="AGENT_NOT_CONNECTED",
                retry_delay=5.0,
            )
        payload = json.dumps(
            {"node": node, "command": base64.b64encode(command.SerializeToString()).decode()}
        )
        receivers = await self.store.redis.publish(self.store.channel(holder), payload)
        if not receivers:
            raise Unavailable(
                f"the replica holding nodes/{node}'s session is gone",
                reason="AGENT_NOT_CONNECTED",
                retry_delay=5.0,
            )
        got = await self.store.redis.blpop(
            [self.store.reply_key(command.id)], timeout=max(wait, 0.01)
        )
        if got is None:
            raise DeadlineExceeded(
                f"nodes/{node}'s agent did not answer within {wait:g}s", reason="AGENT_TIMEOUT"
            )
        answer: dict[str, Any] = json.loads(got[1])
        if "error" in answer:
            raise Unavailable(
                f"nodes/{node}: {answer['error']}", reason="AGENT_NOT_CONNECTED", retry_delay=5.0
            )
        return answer

    async def reply(self, command_id: str, answer: dict[str, Any]) -> None:
        """Push a command's answer for whoever waits on it."""
        key = self.store.reply_key(command_id)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(answer))
            pipe.expire(key, REPLY_TTL)
            await pipe.execute()
