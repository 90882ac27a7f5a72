"""The audit outbox: a change and its audit record commit together, a relay appends them.

The one audit rule of the mesh (docs/policy-audit.md, "The audit rule"):

- A state change and its audit record are written in ONE Redis transaction
  (a Lua script or MULTI/EXEC): the change plus an entry in the service's
  outbox stream. There is no change without its record and no record
  without its change.
- One ``Relay`` per process appends outbox records to policy-audit's log in
  stream order (which is commit order), many per ``BatchAppendEntries``,
  and deletes them only once the log has them. Each record carries its own
  request id, so a record appended twice (a relay that died between the
  append and the delete) is one entry. Nothing is dropped: a record stays in
  Redis until it is appended; the backlog is a metric and a health status.
- An audited RPC answers after its entry is in the log (``AuditTrail`` in
  audit.py waits for the relay), or, when its deadline runs out first, with
  an error whose ErrorInfo metadata says ``committed: "true"``.

A store takes part through ``Outbox.script`` (wraps a Lua script so that it
also adds the current call's record when, and only when, the script's
success condition holds) or ``Outbox.execute`` (adds the record to a
MULTI/EXEC pipeline). The record of the call being served is in the
``current_audit`` context variable, set by the mesh interceptor for RPCs
whose method option says ``audited``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from google.protobuf import message as pb_message
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from autoecoops.audit.v1 import audit_pb2
from autoecoops.common.v1 import options_pb2
from autoecoops.events.v1 import envelope_pb2, events_pb2
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.backoff import Backoff
from autoecoops.kernel.mesh.redis import is_cluster, maybe_ran, service_base

log = logging.getLogger("autoecoops.mesh.outbox")

#: Appended record ids each relay remembers (for waiters that come late).
RECENT = 65_536
#: The field of an outbox stream entry holding a serialized AppendEntryRequest.
RECORD_FIELD = b"r"
#: The field of an events-outbox stream entry: the events of one change, packed.
EVENTS_FIELD = b"ev"
_rng = random.Random()


def make_event(
    payload: pb_message.Message, *, source: str, subject: str, resource: str, key: str
) -> events_pb2.PublishRequest:
    """The publish of one event: topic and type from the payload's event option, the
    current call's actor and trace (a fresh trace outside one), ``key`` as idempotency key."""
    spec = payload.DESCRIPTOR.GetOptions().Extensions[options_pb2.event]
    if not spec.type or not spec.topic:
        raise ValueError(f"{payload.DESCRIPTOR.full_name} is not an event payload")
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        tp = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    else:
        tp = f"00-{_rng.getrandbits(128):032x}-{_rng.getrandbits(64):016x}-00"
    principal = current_principal.get()
    env = envelope_pb2.Envelope(
        source=source,
        type=spec.type,
        subject=subject,
        resource=resource,
        idempotency_key=key,
        data_content_type="application/protobuf",
        trace_parent=tp,
    )
    if principal is not None:
        env.actor.subject, env.actor.issuer = principal.subject, principal.issuer
        env.actor.actors[:] = list(principal.actors)
    else:
        env.actor.subject = "system:" + source.rsplit("/", 1)[-1]
    env.time.FromNanoseconds(time.time_ns() // 1000 * 1000)
    env.data.Pack(payload)
    return events_pb2.PublishRequest(topic=spec.topic, envelope=env)


def pack_events(events: Sequence[events_pb2.PublishRequest]) -> bytes:
    """The events of one change as one stream field (length-prefixed publishes)."""
    out = bytearray()
    for e in events:
        raw = e.SerializeToString()
        out += b"%d %s" % (len(raw), raw)
    return bytes(out)


def unpack_events(blob: bytes) -> list[events_pb2.PublishRequest]:
    """The inverse of ``pack_events``."""
    out, pos = [], 0
    while pos < len(blob):
        sp = blob.index(b" ", pos)
        n = int(blob[pos:sp])
        out.append(events_pb2.PublishRequest.FromString(blob[sp + 1 : sp + 1 + n]))
        pos = sp + 1 + n
    return out


BACKLOG = Gauge(
    "autoecoops_audit_outbox_backlog",
    "Audit records committed with their change but not yet appended to the log, by outbox.",
    ["outbox"],
)
OLDEST = Gauge(
    "autoecoops_audit_outbox_oldest_age_seconds",
    "Age of the oldest record waiting in the outbox (0 when empty), by outbox.",
    ["outbox"],
)
RELAYED = Counter(
    "autoecoops_audit_outbox_relayed_total",
    "Outbox records appended to the audit log by this process's relay, by outbox.",
    ["outbox"],
)
BATCHES = Counter(
    "autoecoops_audit_outbox_batches_total",
    "BatchAppendEntries calls that succeeded, by outbox.",
    ["outbox"],
)
FAILURES = Counter(
    "autoecoops_audit_outbox_append_failures_total",
    "Appends of outbox records that failed and will be retried, by outbox.",
    ["outbox"],
)
PUBLISHED = Counter(
    "autoecoops_audit_outbox_events_published_total",
    "Event records of changes published to event-bus by this process's relay, by stream.",
    ["outbox"],
)
REJECTED = Counter(
    "autoecoops_audit_outbox_rejected_total",
    "Outbox records the log refused as invalid, kept in the outbox's rejected stream.",
    ["outbox"],
)
LOG_REACHABLE = Gauge(
    "autoecoops_audit_log_reachable",
    "1 while this process's relay can append to the audit log, else 0.",
)


@dataclass(eq=False)
class AuditContext:
    """The audit record of the call being served, and where it was staged."""

    #: The append: entry (time, actor, trace id, action, resource, outcome) and request id.
    request: audit_pb2.AppendEntryRequest
    #: The outbox stream and record id once the record committed with a change.
    outbox: Outbox | None = None
    staged_id: str = ""
    #: True once a store's write ran for this call: if it committed nothing,
    #: the call changed nothing and gets no SUCCESS entry.
    observed: bool = False
    #: True once a write carrying the record failed in a way that leaves it
    #: unknown whether Redis ran it (its reply was lost, ``maybe_ran``): the
    #: call then answers ``committed: "unknown"``, never a plain failure.
    in_doubt: bool = False
    #: Events to publish with the record when it is committed on its own.
    events: list[events_pb2.PublishRequest] = field(default_factory=list)

    @property
    def staged(self) -> bool:
        """True once the record is committed (and so will reach the log)."""
        return bool(self.staged_id)

    def record(self) -> bytes:
        """The record's bytes, its time set to now (when the change commits)."""
        self.request.entry.time.FromNanoseconds(time.time_ns() // 1000 * 1000)
        return self.request.SerializeToString()


#: The audit record of the audited call being served, if any.
current_audit: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar(
    "autoecoops_audit", default=None
)

#: Records the RPC being served committed on their own (a platform's domain
#: entries, ``AuditTrail.record``), audited method or not: the call answers
#: once they are in the log too, so its caller can read what it did. Set per
#: call by the mesh interceptor; None outside a call.
current_records: contextvars.ContextVar[list[tuple[Outbox, str]] | None] = contextvars.ContextVar(
    "autoecoops_records", default=None
)

_WRAP = """
local __ob_key, __ob_evkey = KEYS[#KEYS - 1], KEYS[#KEYS]
local __ob_ev, __ob_rec = ARGV[#ARGV - 1], ARGV[#ARGV]
KEYS[#KEYS] = nil
KEYS[#KEYS] = nil
ARGV[#ARGV] = nil
ARGV[#ARGV] = nil
local __ob_r = (function()
{body}
end)()
if type(__ob_r) == 'table' and __ob_r.err then return __ob_r end
local __ob_id = ''
if __ob_rec ~= '' or __ob_ev ~= '' then
  local r = __ob_r
  if ({ok}) then
    if __ob_rec ~= '' then __ob_id = redis.call('XADD', __ob_key, '*', 'r', __ob_rec) end
    if __ob_ev ~= '' then redis.call('XADD', __ob_evkey, '*', 'ev', __ob_ev) end
  end
end
return {{__ob_id, __ob_r}}
"""


@contextlib.contextmanager
def _doubt(ctx: AuditContext | None, client: aioredis.Redis) -> Iterator[None]:
    """Mark ``ctx`` in doubt when the write of its record (in the block) fails
    in a way that leaves unknown whether Redis ran it."""
    try:
        yield
    except BaseException as err:
        if ctx is not None and maybe_ran(err, is_cluster(client)):
            ctx.in_doubt = True
        raise


class OutboxScript:
    """A store's Lua script that also commits the current call's audit record."""

    def __init__(
        self, outbox: Outbox, source: str, ok: str, client: aioredis.Redis | None = None
    ) -> None:
        self._outbox = outbox
        self._script = (client or outbox.redis).register_script(_WRAP.format(body=source, ok=ok))

    async def __call__(
        self,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        events: Sequence[events_pb2.PublishRequest] = (),
    ) -> Any:
        """Run the script; its own result. When ``ok`` held, the call's record and
        ``events`` were committed with the change."""
        ctx = current_audit.get()
        pending = ctx is not None and not ctx.staged
        record = ctx.record() if pending and ctx is not None else b""
        if ctx is not None:
            ctx.observed = True
        box = self._outbox
        with _doubt(ctx if record else None, box.redis):
            reply = await self._script(
                keys=[*keys, box.key, box.events_key], args=[*args, pack_events(events), record]
            )
        if events and box.relay is not None:
            box.relay.wake_key(box.events_key)
        staged = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if staged and ctx is not None:
            self._outbox.staged(ctx, staged)
        return reply[1] if len(reply) > 1 else None


class Outbox:
    """One service's outbox stream: records committed with changes, waiting for the log."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        relay: Relay | None = None,
        decode: Callable[[str, Mapping[bytes, bytes]], audit_pb2.AppendEntryRequest] | None = None,
        batch: int = 0,
    ) -> None:
        self.redis = redis
        self.key = key
        #: Records a relay sends per append (0: the relay's default). A stream
        #: nobody waits on takes small bites, so the log's group commit never
        #: makes a waiting call queue behind hundreds of its records.
        self.batch = batch
        #: Turns a stream record into its append (for records written by Lua
        #: in their own shape, e.g. event-bus's processing outcomes).
        self.decode = decode or _decode
        #: Where records that the log refused as invalid are kept (never dropped).
        self.rejected_key = key + ":rejected"
        self.lease_key = key + ":relay"
        #: Events committed with changes, published to event-bus by the relay.
        self.events_key = key + ":events"
        self.relay = relay
        if relay is not None:
            relay.watch(self)

    def script(
        self, source: str, ok: str = "true", client: aioredis.Redis | None = None
    ) -> OutboxScript:
        """Register ``source`` so that it also adds the current call's record.

        ``ok`` is a Lua expression over the script's result ``r`` that is true
        when the script changed state (e.g. ``r == 1``): the record is added
        only then, in the same script, so a refused change leaves no record.
        ``client`` runs it (the store's own connection pool, same server).
        """
        return OutboxScript(self, source, ok, client)

    async def execute(
        self, pipe: Any, events: Sequence[events_pb2.PublishRequest] = ()
    ) -> list[Any]:
        """Add the current call's record (and ``events``) to a MULTI/EXEC ``pipe`` and run it.

        Returns the pipeline's results without those of the added commands.
        """
        ctx = current_audit.get()
        record = ctx is not None and not ctx.staged
        if ctx is not None:
            ctx.observed = True
        if record and ctx is not None:
            pipe.xadd(self.key, {RECORD_FIELD: ctx.record()})
        self._events(pipe, events)
        with _doubt(ctx if record else None, self.redis):
            results = list(await pipe.execute())
        if events:
            results.pop()
            if self.relay is not None:
                self.relay.wake_key(self.events_key)
        if record and ctx is not None:
            sid = results.pop()
            self.staged(ctx, sid.decode() if isinstance(sid, bytes) else str(sid))
        return results

    def _events(self, pipe: Any, events: Sequence[events_pb2.PublishRequest]) -> None:
        if events:
            pipe.xadd(self.events_key, {EVENTS_FIELD: pack_events(events)})

    async def add(
        self,
        request: audit_pb2.AppendEntryRequest,
        events: Sequence[events_pb2.PublishRequest] = (),
    ) -> str:
        """Commit one record (and its events) on its own: a change outside Redis, a decision."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.key, {RECORD_FIELD: request.SerializeToString()})
            self._events(pipe, events)
            got = await pipe.execute()
        if self.relay is not None:
            self.relay.wake(self)
        sid = got[0]
        return sid.decode() if isinstance(sid, bytes) else str(sid)

    async def stage(self, ctx: AuditContext) -> None:
        """Commit the call's record on its own when no store did (nothing else changed)."""
        if ctx.staged:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.key, {RECORD_FIELD: ctx.record()})
            self._events(pipe, ctx.events)
            with _doubt(ctx, self.redis):
                got = await pipe.execute()
        sid = got[0]
        self.staged(ctx, sid.decode() if isinstance(sid, bytes) else str(sid))

    def staged(self, ctx: AuditContext, sid: str) -> None:
        """Note that ``ctx``'s record committed as ``sid`` here; wake the relay."""
        ctx.outbox, ctx.staged_id = self, sid
        if self.relay is not None:
            self.relay.wake(self)
            if ctx.events:
                self.relay.wake_key(self.events_key)

    async def backlog(self, key: str = "") -> tuple[int, float]:
        """(records waiting, age in seconds of the oldest) of the outbox (or its ``key`` stream)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(key or self.key)
            pipe.xrange(key or self.key, "-", "+", count=1)
            size, first = await pipe.execute()
        if not first:
            return int(size), 0.0
        ms = int(first[0][0].decode().partition("-")[0])
        return int(size), max(0.0, time.time() - ms / 1000)


def _decode(sid: str, fields: Mapping[bytes, bytes]) -> audit_pb2.AppendEntryRequest:
    return audit_pb2.AppendEntryRequest.FromString(fields.get(RECORD_FIELD, b""))


#: Appends a batch to the log, in order: the index of each. Raises on failure.
BatchAppend = Callable[[Sequence[audit_pb2.AppendEntryRequest]], Awaitable[Sequence[int]]]
#: Publishes events of one topic to event-bus, in order (deduplicated by idempotency key).
Publish = Callable[[str, Sequence[envelope_pb2.Envelope]], Awaitable[None]]


class LogRejected(Exception):
    """The log refused a batch as invalid (a bug: records are built by the mesh),
    or one record's request id as already used (``REQUEST_ID_REUSED``)."""

    def __init__(
        self, message: str, reason: str = "", metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})

    @property
    def recorded(self) -> int | None:
        """The index of the entry already holding this record's request id, -1 when the
        log did not say; None when the refusal is not that.

        The mesh's request ids are random, or derived from a client's own
        request id (a retry of one change, AIP-155): the id is taken only by an
        earlier attempt at the same change, so the change is recorded already.
        """
        if self.reason != "REQUEST_ID_REUSED":
            return None
        try:
            return int(self.metadata.get("index", "-1"))
        except ValueError:
            return -1


@dataclass
class _Watch:
    outbox: Outbox
    #: The stream drained: the outbox's audit records, or its events.
    key: str
    events: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    leader: bool = False
    lease_until: float = 0.0
    #: The id of the last record drained (records are deleted once drained).
    last_id: Any = "0-0"
    #: Record id -> futures of the calls waiting for it, resolved with its index.
    waiters: dict[str, list[asyncio.Future[int]]] = field(default_factory=dict)
    #: Record id -> index of what this relay appended lately, for a waiter
    #: that comes after its record was appended (a long handler, a fast relay).
    recent: dict[str, int] = field(default_factory=dict)


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Relay:
    """Appends the outboxes of this process to the audit log, in order, exactly once,
    and publishes the events committed with the changes.

    One drain task per stream; among replicas of a service the one holding
    the stream's lease drains it (so the log receives records in commit
    order), the others see their records leave the stream.
    """

    def __init__(
        self,
        append: BatchAppend,
        *,
        probe: Callable[[float], Awaitable[Any]] | None = None,
        publish: Publish | None = None,
        batch: int = 500,
        lease_ttl: float = 10.0,
        probe_interval: float = 1.0,
        max_backoff: float = 1.0,
    ) -> None:
        self.append = append
        #: Asks the log whether it is there, waiting up to the given seconds for a
        #: connection (a fresh look, not the channel's last failure).
        self.probe = probe
        self.publish = publish
        self._probing: asyncio.Task[None] | None = None
        self._probed_at = 0.0
        self.batch = batch
        self.lease_ttl = lease_ttl
        self.probe_interval = probe_interval
        self.max_backoff = max_backoff
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._watches: dict[str, _Watch] = {}
        #: False after a failed append or probe, until one succeeds.
        self.reachable = True
        self.last_error = ""
        self._closed = False
        #: Called with the new state when the log becomes (un)reachable.
        self.listeners: list[Callable[[bool], None]] = []
        LOG_REACHABLE.set(1)

    def _tell(self, reachable: bool) -> None:
        for listener in self.listeners:
            try:
                listener(reachable)
            except Exception:
                log.exception("an audit relay listener failed")

    def watch(self, outbox: Outbox) -> None:
        """Drain ``outbox`` too (its tasks start with the first record, a wait, or ``start``)."""
        self._watches.setdefault(outbox.key, _Watch(outbox, outbox.key))
        if self.publish is not None:
            self._watches.setdefault(outbox.events_key, _Watch(outbox, outbox.events_key, True))

    def wake(self, outbox: Outbox) -> None:
        """A record was committed to ``outbox``: drain it now."""
        if outbox.key not in self._watches:
            self.watch(outbox)
        self.wake_key(outbox.key)

    def wake_key(self, key: str) -> None:
        """Something was committed to stream ``key``: drain it now."""
        w = self._watches.get(key)
        if w is not None:
            w.wake.set()
            self._ensure(w)

    def start(self) -> None:
        """Start draining every watched stream (what earlier runs left goes first)."""
        for w in self._watches.values():
            self._ensure(w)

    def _ensure(self, w: _Watch) -> None:
        if self._closed or (w.task is not None and not w.task.done()):
            return
        # A fresh context: the drain must not inherit the deadline, principal
        # or audit record of the call that happened to start it.
        w.task = asyncio.get_running_loop().create_task(
            self._drain(w), name=f"audit-relay:{w.key}", context=contextvars.Context()
        )

    async def wait(self, outbox: Outbox, sid: str, within: float | None) -> int | None:
        """The log index of record ``sid`` once appended (-1: appended elsewhere, index
        unknown); None if ``within`` seconds run out first."""
        timeout = within
        w = self._watches[outbox.key]
        self._ensure(w)
        if sid in w.recent:
            return w.recent[sid]
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        w.waiters.setdefault(sid, []).append(fut)
        try:
            if w.leader or (timeout is not None and timeout <= 0):
                done, _ = await asyncio.wait({fut}, timeout=timeout)
                return fut.result() if done else None
            # Another replica may be draining: watch the record leave the stream.
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                done, _ = await asyncio.wait({fut}, timeout=min(0.05, left or 0.05))
                if done:
                    return fut.result()
                if not w.leader:
                    got: Any = await outbox.redis.xrange(outbox.key, sid, sid)
                    if not got:
                        return -1  # appended by another replica; its index is not known here
        finally:
            waiting = w.waiters.get(sid)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del w.waiters[sid]

    async def _lead(self, w: _Watch) -> bool:
        now = time.monotonic()
        if w.leader and now < w.lease_until - self.lease_ttl / 2:
            return True
        ttl_ms = int(self.lease_ttl * 1000)
        got = await w.outbox.redis.eval(_RENEW, 1, w.key + ":relay", self.owner, ttl_ms)
        w.leader = bool(got)
        w.lease_until = now + self.lease_ttl if w.leader else 0.0
        return w.leader

    async def _drain(self, w: _Watch) -> None:
        label = w.key
        backoff = Backoff(0.05, self.max_backoff)
        last_probe = time.monotonic()
        while not self._closed:
            try:
                if not await self._lead(w):
                    w.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(w.wake.wait(), timeout=self.lease_ttl / 4)
                    continue
                w.wake.clear()
                batch = w.outbox.batch or self.batch
                items: Any = await w.outbox.redis.xrange(label, "-", "+", count=batch)
                if not items:
                    BACKLOG.labels(label).set(0)
                    OLDEST.labels(label).set(0)
                    probe = time.monotonic() - last_probe >= self.probe_interval
                    if not w.events and (probe or not self.reachable):
                        last_probe = time.monotonic()
                        await self.append([])  # a probe: is the log there?
                        self._up()
                    await self._idle(w)
                    continue
                w.last_id = items[-1][0]
                if w.events:
                    await self._publish(w, items)
                else:
                    await self._send(w, items)
                    self._up()
                backoff.reset()
                if len(items) >= batch:
                    w.wake.set()  # more is waiting
                size, age = await w.outbox.backlog(label)
                BACKLOG.labels(label).set(size)
                OLDEST.labels(label).set(age)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the log, event-bus or Redis is down: keep all, retry
                FAILURES.labels(label).inc()
                if w.events:
                    log.warning("publishing the events of %s failed (%s); retrying", label, err)
                else:
                    self._down(err)
                await asyncio.sleep(backoff.next())

    async def _idle(self, w: _Watch) -> None:
        """Wait for the next record: a blocking XREAD past the last one drained, so a
        record committed by any replica (not only this process) wakes the drain at once."""
        got: Any = await w.outbox.redis.xread(
            {w.key: w.last_id}, count=1, block=max(1, int(self.probe_interval * 1000))
        )
        if got:
            w.wake.set()

    async def _publish(self, w: _Watch, items: Sequence[Any]) -> None:
        """Publish the events of ``items`` in order (runs of one topic per call), then drop them."""
        assert self.publish is not None
        ids = []
        run_topic, run = "", list[envelope_pb2.Envelope]()
        for raw_id, fields in items:
            ids.append(raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id))
            for req in unpack_events(fields.get(EVENTS_FIELD, b"")):
                if run and req.topic != run_topic:
                    await self._publish_run(w, run_topic, run)
                    run = []
                run_topic = req.topic
                run.append(req.envelope)
        if run:
            await self._publish_run(w, run_topic, run)
        await w.outbox.redis.xdel(w.key, *ids)
        PUBLISHED.labels(w.key).inc(len(ids))

    async def _publish_run(
        self, w: _Watch, topic: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> None:
        assert self.publish is not None
        try:
            await self.publish(topic, envelopes)
        except LogRejected as err:  # refused as invalid: kept aside, never blocks the rest
            REJECTED.labels(w.key).inc()
            log.error("event-bus refused %d events on %s: %s", len(envelopes), topic, err)
            await w.outbox.redis.xadd(
                w.outbox.events_key + ":rejected",
                {
                    EVENTS_FIELD: pack_events(
                        [events_pb2.PublishRequest(topic=topic, envelope=e) for e in envelopes]
                    ),
                    b"error": str(err),
                },
            )

    async def _send(self, w: _Watch, items: Sequence[Any]) -> None:
        requests = []
        ids = []
        for raw_id, fields in items:
            ids.append(raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id))
            requests.append(w.outbox.decode(ids[-1], fields))
        try:
            indexes = list(await self.append(requests))
        except LogRejected:
            indexes = await self._one_by_one(w, ids, requests)
        await w.outbox.redis.xdel(w.key, *ids)
        while len(w.recent) > RECENT:
            del w.recent[next(iter(w.recent))]  # oldest first (dicts keep insertion order)
        RELAYED.labels(w.key).inc(len(ids))
        BATCHES.labels(w.key).inc()
        for sid, index in zip(ids, indexes, strict=True):
            w.recent[sid] = index
            for fut in w.waiters.pop(sid, ()):
                if not fut.done():
                    fut.set_result(index)

    async def _one_by_one(
        self, w: _Watch, ids: list[str], requests: list[audit_pb2.AppendEntryRequest]
    ) -> list[int]:
        """Find the record the log refuses; keep it aside so it cannot block the rest."""
        out: list[int] = []
        for sid, req in zip(ids, requests, strict=True):
            try:
                out.extend(await self.append([req]))
            except LogRejected as err:
                if err.recorded is not None:
                    log.info("outbox record %s is a retry of a recorded change: %s", sid, err)
                    out.append(err.recorded)
                    continue
                REJECTED.labels(w.key).inc()
                log.error("the audit log refused outbox record %s (%s): %s", sid, req, err)
                await w.outbox.redis.xadd(
                    w.outbox.rejected_key,
                    {RECORD_FIELD: req.SerializeToString(), b"error": str(err), b"id": sid},
                )
                out.append(-1)
        return out

    async def recheck(self, within: float) -> bool:
        """Whether the log is reachable, looking again if it was not: one probe at a
        time for every caller, and none while the last one failed moments ago.

        Without it the first calls after the log comes back would be refused
        on the relay's old verdict (it probes once a second, and gRPC waits
        out its reconnect backoff) although the log is there.
        """
        if self.reachable or self.probe is None or within <= 0:
            return self.reachable
        if self._probing is None or self._probing.done():
            if time.monotonic() - self._probed_at < self.probe_interval / 2:
                return False
            self._probing = asyncio.get_running_loop().create_task(
                self._probe_once(within), name="audit-probe", context=contextvars.Context()
            )
        await asyncio.wait({self._probing}, timeout=within)
        return self.reachable

    async def _probe_once(self, within: float) -> None:
        assert self.probe is not None
        try:
            await self.probe(within)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._down(err)
        else:
            self._up()
            for w in self._watches.values():
                w.wake.set()  # drain what waited for the log
        finally:
            self._probed_at = time.monotonic()

    def _up(self) -> None:
        if not self.reachable:
            log.info("the audit log is reachable again; draining the outbox")
            self.reachable = True
            self._tell(True)
        self.reachable = True
        self.last_error = ""
        LOG_REACHABLE.set(1)

    def _down(self, err: Exception) -> None:
        if self.reachable:
            log.warning("the audit log is unreachable (%s); keeping records in the outbox", err)
            self.reachable = False
            self._tell(False)
        else:
            log.debug("the audit log is still unreachable: %s", err)
        self.reachable = False
        self.last_error = str(err) or type(err).__name__
        LOG_REACHABLE.set(0)
        if isinstance(err, redis.exceptions.ConnectionError):
            for w in self._watches.values():
                w.leader = False

    async def status(self) -> dict[str, Any]:
        """Health detail: whether the log is reachable, and each stream's backlog."""
        out: dict[str, Any] = {"log_reachable": self.reachable, "last_error": self.last_error}
        for key, w in self._watches.items():
            try:
                size, age = await w.outbox.backlog(key)
                out[key] = {"backlog": size, "oldest_age_seconds": round(age, 3)}
            except redis.exceptions.RedisError as err:
                out[key] = {"error": str(err)}
        return out

    async def flush(self, within: float = 5.0, *, while_reachable: bool = False) -> bool:
        """Wait until every watched stream is empty; False if ``within`` seconds run out
        (or, with ``while_reachable``, as soon as the log is found unreachable)."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            if while_reachable and not self.reachable:
                return False
            sizes = [await w.outbox.redis.xlen(key) for key, w in self._watches.items()]
            if not any(sizes):
                return True
            for w in self._watches.values():
                w.wake.set()
                self._ensure(w)
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        """Stop draining (what is left stays in Redis for the next start)."""
        self._closed = True
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for key, w in self._watches.items():
            if w.leader:
                with contextlib.suppress(redis.exceptions.RedisError):
                    await w.outbox.redis.eval(_RELEASE, 1, key + ":relay", self.owner)


async def backlogs(redis: aioredis.Redis, prefix: str) -> dict[str, dict[str, Any]]:
    """Every outbox stream under ``prefix`` (audit records, events, event-bus outcomes,
    rejected records) with its backlog and the age of its oldest record."""
    found: dict[str, dict[str, Any]] = {}
    bus = service_base(prefix, "events", is_cluster(redis))
    patterns = (f"{prefix}*:outbox", f"{prefix}*:outbox:*", f"{bus}:_bus:audit*")
    keys: set[str] = set()
    for pattern in patterns:
        async for k in redis.scan_iter(match=pattern, count=1000):
            key = k.decode() if isinstance(k, bytes) else str(k)
            if not key.endswith(":relay"):
                keys.add(key)
    for key in sorted(keys):
        box = Outbox(redis, key)
        size, age = await box.backlog()
        found[key] = {"backlog": size, "oldest_age_seconds": round(age, 3)}
    return found
