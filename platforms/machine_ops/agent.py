"""``autoecoops agent``: the node agent. It only dials out.

1. Enrollment: with a one-time enrollment secret it calls EnrollAgent once
   and keeps the node identity's client credentials in its state directory
   (mode 0600). Tokens come from auth-service's IssueToken with those
   credentials; they are short-lived and renewed before they expire, so
   every session opens with a fresh one.
2. Session: one AgentSession stream. The platform's Welcome names the last
   sequence it applied; the agent forgets its buffered messages up to it and
   resends the rest in order, then streams new ones, and heartbeats.
3. Offline: evaluations and inventory deltas go to the on-disk outbox first
   (``buffer.Outbox``) whether or not the platform is reachable; they leave
   it only when acked. Reconnects wait a jittered exponential backoff
   (the SDK's ``Retry`` policy, full jitter).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.machineops.v1 import machineops_pb2_grpc
from autoecoops.platforms.machine_ops import checks, convert, inventory
from autoecoops.platforms.machine_ops.buffer import Outbox
from autoecoops.sdk.retry import Retry

log = logging.getLogger("autoecoops.agent")
VERSION = "0.1.0"
CAPABILITIES = ["inventory", "baseline", "remediate"]


@dataclass
class AgentConfig:
    """Where the agent connects and how often it works."""

    #: machine-ops' address, host:port.
    platform: str
    #: auth-service's address, host:port (tokens for the node identity).
    auth: str
    #: The node's id (the enrollment token's node_id).
    node_id: str
    #: Credentials, the outbox and the last known baselines live here.
    state_dir: Path
    #: The one-time enrollment secret; needed only until enrolled.
    enroll_secret: str = ""
    #: Seconds between scheduled evaluations of the node's baselines (0: only on command).
    evaluate_interval: float = 300.0
    #: Seconds between inventory collections (0: only on command).
    inventory_interval: float = 600.0
    #: Messages the outbox holds before dropping the oldest.
    buffer_capacity: int = 10_000
    #: Reconnect backoff.
    retry: Retry = field(
        default_factory=lambda: Retry(
            initial=timedelta(seconds=0.5), maximum=timedelta(seconds=30), max_attempts=100
        )
    )


class Agent:
    """One node's agent."""

    def __init__(self, config: AgentConfig, host: checks.Host | None = None) -> None:
        self.config = config
        self.host = host or checks.Host()
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.outbox = Outbox(config.state_dir / "outbox.sqlite3", config.buffer_capacity)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._token: tuple[str, float] = ("", 0.0)
        self.connected = asyncio.Event()
        #: Sessions opened since start (for tests and logs).
        self.sessions = 0
        #: Messages put in the outbox since start, by kind.
        self.enqueued: dict[str, int] = {}
        self._baselines: list[pb.Baseline] = self._load_baselines()
        self._inventory: inventory.Tables = self._load_json("inventory.json", {})

    # -- state files -------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.config.state_dir / name

    def _load_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return default

    def _save_json(self, name: str, value: Any, private: bool = False) -> None:
        tmp = self._path(name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh)
        os.replace(tmp, self._path(name))

    def _load_baselines(self) -> list[pb.Baseline]:
        raw = self._load_json("baselines.json", [])
        return [json_format.ParseDict(b, pb.Baseline()) for b in raw]

    # -- identity ---------------------------------------------------------------------

    async def ensure_enrolled(self, channel: grpc.aio.Channel) -> dict[str, str]:
        """The node identity's credentials, enrolling first if there are none."""
        creds: dict[str, str] = self._load_json("identity.json", {})
        if creds.get("client_id"):
            return creds
        if not self.config.enroll_secret:
            raise RuntimeError("not enrolled and no enrollment secret given (--enroll-secret-file)")
        # One request id per enrollment attempt, kept across restarts, so a
        # retry after a lost reply gets the same credentials back.
        pending = self._load_json("enroll-request.json", {})
        request_id = pending.get("request_id") or uuid.uuid4().hex
        self._save_json("enroll-request.json", {"request_id": request_id}, private=True)
        stub = machineops_pb2_grpc.MachineOpsServiceStub(channel)
        reply = await stub.EnrollAgent(
            pb.EnrollAgentRequest(
                node_id=self.config.node_id,
                secret=self.config.enroll_secret,
                agent_version=VERSION,
                request_id=request_id,
            ),
            timeout=30.0,
        )
        creds = {
            "client_id": reply.client_id,
            "client_secret": reply.client_secret,
            "node": reply.node.name,
        }
        self._save_json("identity.json", creds, private=True)
        self._path("enroll-request.json").unlink(missing_ok=True)
        log.info("enrolled as %s (identity %s)", reply.node.name, reply.client_id)
        return creds

    async def token(self, auth: grpc.aio.Channel, creds: dict[str, str]) -> str:
        """A valid token of the node identity, renewed a minute before it expires."""
        tok, exp = self._token
        if tok and exp - 60 > time.time():
            return tok
        stub = auth_pb2_grpc.AuthServiceStub(auth)
        reply = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                client_id=creds["client_id"], client_secret=creds["client_secret"]
            ),
            timeout=15.0,
        )
        self._token = (reply.access_token, reply.expire_time.ToNanoseconds() / 1e9)
        return str(reply.access_token)

    # -- producing messages -------------------------------------------------------------

    def enqueue(self, msg: pb.AgentSessionRequest) -> int:
        """Put a message in the outbox (it is sent when connected); its sequence."""
        seq = self.outbox.append(msg.SerializeToString())
        kind = msg.WhichOneof("message") or ""
        self.enqueued[kind] = self.enqueued.get(kind, 0) + 1
        self._wake.set()
        return seq

    async def evaluate(
        self, baselines: list[pb.Baseline], control_ids: list[str], command_id: str = ""
    ) -> int:
        """Evaluate baselines on this machine and enqueue the report."""

        def run() -> list[pb.ControlResult]:
            out = []
            for b in baselines:
                for c in b.controls:
                    if control_ids and c.id not in control_ids:
                        continue
                    r = checks.evaluate(self.host, b.name, b.version, convert.control_from_pb(c))
                    out.append(convert.result_to_pb(r))
            return out

        results = await asyncio.to_thread(run)
        report = pb.EvaluationReport(
            command_id=command_id, results=results, evaluate_time=convert.ts(time.time())
        )
        return self.enqueue(pb.AgentSessionRequest(evaluation=report))

    async def collect_inventory(self, full: bool = False) -> int | None:
        """Collect inventory and enqueue what changed (everything when ``full``)."""
        tables = await asyncio.to_thread(inventory.collect)
        changed, removed = (tables, []) if full else inventory.diff(self._inventory, tables)
        if not changed and not removed:
            return None
        delta = pb.InventoryDelta(
            tables=convert.tables_to_pb(changed),
            removed_tables=removed,
            collect_time=convert.ts(time.time()),
        )
        seq = self.enqueue(pb.AgentSessionRequest(inventory=delta))
        self._inventory = tables
        self._save_json("inventory.json", tables)
        return seq

    async def handle(self, command: pb.Command) -> None:
        """Run a command from the platform; its answer goes through the outbox."""
        action = command.WhichOneof("action")
        if action == "evaluate":
            await self.evaluate(
                list(command.evaluate.baselines), list(command.evaluate.control_ids), command.id
            )
            return
        result = pb.CommandResult(command_id=command.id, status=pb.COMMAND_STATUS_SUCCEEDED)
        try:
            if action == "collect_inventory":
                seq = await self.collect_inventory(full=True)
                result.message = f"inventory sent as message {seq}"
            elif action == "remediate":
                control = convert.control_from_pb(command.remediate.control)
                if not control.remediable or control.check.kind != "sysctl":
                    result.status = pb.COMMAND_STATUS_REJECTED
                    result.message = f"control {control.id} does not allow remediation"
                else:
                    changed, before, after = await asyncio.to_thread(
                        checks.remediate_sysctl, self.host, control, command.remediate.dry_run
                    )
                    result.message = (
                        "changed"
                        if changed
                        else ("dry run" if command.remediate.dry_run else "already compliant")
                    )
                    result.output.CopyFrom(
                        _struct(
                            {
                                "key": control.check.key,
                                "before": before,
                                "after": after,
                                "changed": changed,
                            }
                        )
                    )
            else:
                result.status = pb.COMMAND_STATUS_REJECTED
                result.message = f"unknown command {action}"
        except Exception as err:  # the platform hears about every failure
            result.status = pb.COMMAND_STATUS_FAILED
            result.message = f"{type(err).__name__}: {err}"
        self.enqueue(pb.AgentSessionRequest(command_result=result))

    async def _schedule(self) -> None:
        """Scheduled evaluations and inventory, online or not."""
        next_eval = time.monotonic() if self.config.evaluate_interval else float("inf")
        next_inv = time.monotonic() if self.config.inventory_interval else float("inf")
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_inv:
                try:
                    await self.collect_inventory()
                except Exception:
                    log.exception("inventory collection failed")
                next_inv = now + self.config.inventory_interval
            if now >= next_eval and self._baselines:
                await self.evaluate(self._baselines, [])
                next_eval = now + self.config.evaluate_interval
            wait = max(0.05, min(next_eval, next_inv) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(wait, 1.0))

    # -- the session ------------------------------------------------------------------

    async def _session(self, platform: grpc.aio.Channel, auth: grpc.aio.Channel) -> None:
        creds = await self.ensure_enrolled(platform)
        token = await self.token(auth, creds)
        stub = machineops_pb2_grpc.MachineOpsServiceStub(platform)
        call = stub.AgentSession(metadata=[("authorization", f"Bearer {token}")])
        hello = pb.AgentHello(
            node=creds.get("node") or f"nodes/{self.config.node_id}",
            agent_version=VERSION,
            epoch=self.outbox.epoch,
            capabilities=CAPABILITIES,
            root=self.host.root,
            dropped=self.outbox.dropped,
        )
        await call.write(pb.AgentSessionRequest(hello=hello))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
            raise ConnectionError("the platform did not welcome the session")
        welcome = first.welcome
        self.outbox.ack_through(welcome.applied_sequence)
        self._baselines = list(welcome.baselines)
        self._save_json("baselines.json", [json_format.MessageToDict(b) for b in self._baselines])
        heartbeat = welcome.heartbeat_interval.ToNanoseconds() / 1e9 or 10.0
        self.sessions += 1
        self.connected.set()
        log.info("session open; %d buffered message(s) to resend", len(self.outbox))

        async def send() -> None:
            last = welcome.applied_sequence
            next_beat = time.monotonic() + heartbeat
            while True:
                for seq, payload in self.outbox.pending(after=last, limit=500):
                    msg = pb.AgentSessionRequest.FromString(payload)
                    msg.sequence = seq
                    await call.write(msg)
                    last = seq
                if time.monotonic() >= next_beat:
                    await call.write(
                        pb.AgentSessionRequest(
                            heartbeat=pb.Heartbeat(send_time=convert.ts(time.time()))
                        )
                    )
                    next_beat = time.monotonic() + heartbeat
                self._wake.clear()
                if self.outbox.pending(after=last, limit=1):
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), max(0.01, next_beat - time.monotonic())
                    )

        sender = asyncio.create_task(send())
        commands: set[asyncio.Task[None]] = set()
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                kind = msg.WhichOneof("message")
                if kind == "ack":
                    self.outbox.ack(msg.ack.sequence)
                elif kind == "command":
                    task = asyncio.create_task(self.handle(msg.command))
                    commands.add(task)
                    task.add_done_callback(commands.discard)
                if sender.done():
                    sender.result()
        finally:
            self.connected.clear()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            call.cancel()

    async def run(self) -> None:
        """Enroll, then keep a session open (reconnecting with backoff) until ``stop``."""
        from autoecoops.kernel.mesh.config import MeshConfig, channel_options

        opts = channel_options(MeshConfig())
        platform = grpc.aio.insecure_channel(self.config.platform, options=opts)
        auth = grpc.aio.insecure_channel(self.config.auth, options=opts)
        scheduler = asyncio.create_task(self._schedule())
        attempt = 0
        try:
            while not self._stop.is_set():
                before = self.sessions
                try:
                    await self._until_stopped(self._session(platform, auth))
                except grpc.aio.AioRpcError as err:
                    log.warning("session ended: %s %s", err.code().name, err.details())
                    if err.code() in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ):
                        self._token = ("", 0.0)
                except (ConnectionError, OSError) as err:
                    log.warning("session ended: %s", err)
                attempt = 1 if self.sessions > before else attempt + 1
                delay = self.config.retry.backoff(attempt, random.random())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await scheduler
            await platform.close()
            await auth.close()
            self.outbox.close()

    async def _until_stopped(self, coro: Any) -> None:
        """Run ``coro`` until it ends or ``stop`` is called (then cancel it)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.done() and not task.cancelled():
            task.result()

    def stop(self) -> None:
        """Ask ``run`` to finish."""
        self._stop.set()


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s
