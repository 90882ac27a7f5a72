"""The audit trail: validated appends with group commit, checkpoints, proofs and reads.

Appends queue up while a commit is in flight; the committer takes everything
queued (up to ``commit_batch``) and writes it as one atomic group with one
signed checkpoint, so throughput grows with concurrency while each append
still returns only once its entry is stored. Only the frontier lives in
memory; history is never rehashed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from google.protobuf import timestamp_pb2

from autoecoops.audit.v1 import audit_pb2
from autoecoops.audit.v1 import events_pb2 as audit_events_pb2
from autoecoops.kernel.mesh.errors import (
    Aborted,
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    OutOfRange,
    Unavailable,
)
from autoecoops.kernel.mesh.outbox import make_event, pack_events
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.canonical import (
    canonical_json,
    entry_json,
    parse_entry,
    with_index,
)
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteSigner, NoteVerifier
from autoecoops.kernel.policy_audit.store import AuditStore, CommitConflict, Prepared

log = logging.getLogger("autoecoops.policy_audit")

MAX_PAGE = 1000
#: The committer waits for company only while fewer entries than this are queued.
LINGER_BELOW = 16
#: How long the committer waits for more appends before it checks again.
LINGER_STEP = 0.001
#: Entries one BatchAppendEntries may carry.
MAX_BATCH = 1000
DEFAULT_PAGE = 100
#: Entries a filtered page may look at before it returns short with a token.
SCAN_FACTOR = 20


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint body with its signed note and signing time."""

    body: CheckpointBody
    note: str
    time_ns: int


@dataclass(frozen=True, slots=True)
class Appended:
    """Where an append landed."""

    index: int
    leaf_hash: bytes
    checkpoint: SignedCheckpoint
    #: True when the request id had been seen and the original entry is returned.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as stored: parsed, its exact bytes and its leaf hash."""

    entry: audit_pb2.AuditEntry
    data: bytes
    leaf_hash: bytes


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """ListEntries filters; every set one must match."""

    start_us: int | None = None
    end_us: int | None = None
    type: str = ""
    actor: str = ""
    resource: str = ""
    trace_id: str = ""


@dataclass
class _Pending:
    #: Canonical bytes without the index (added at commit, when it is known).
    data: bytes
    attrs: dict[str, str]
    request_id: str
    fingerprint: str
    time_us: int
    future: asyncio.Future[Appended]
    followers: list[asyncio.Future[Appended]] = field(default_factory=list)
    service: str = ""
    outcome: int = 0


def _fingerprint(entry: audit_pb2.AuditEntry) -> str:
    return hashlib.sha256(entry.SerializeToString(deterministic=True)).hexdigest()[:32]


def validate_entry(entry: audit_pb2.AuditEntry, request_id: str) -> None:
    """Raise InvalidArgument naming every bad field of an append."""
    bad: list[FieldViolation] = []
    for name in ("type", "service", "action"):
        if not getattr(entry, name):
            bad.append(FieldViolation(f"entry.{name}", "required field is missing"))
    if entry.outcome == audit_pb2.OUTCOME_UNSPECIFIED:
        bad.append(FieldViolation("entry.outcome", "required field is missing"))
    elif not audit_pb2.Outcome.Name(entry.outcome):
        bad.append(FieldViolation("entry.outcome", "unknown outcome"))
    if entry.trace_id and (
        len(entry.trace_id) != 32 or any(c not in "0123456789abcdef" for c in entry.trace_id)
    ):
        bad.append(FieldViolation("entry.trace_id", "a W3C trace id is 32 lowercase hex digits"))
    if not request_id:
        bad.append(FieldViolation("request_id", "required field is missing"))
    elif len(request_id) > 128 or not request_id.isprintable() or " " in request_id:
        bad.append(FieldViolation("request_id", "at most 128 printable characters, no spaces"))
    if bad:
        raise InvalidArgument(
            "invalid audit entry: " + "; ".join(f"{v.field}: {v.description}" for v in bad),
            reason="INVALID_ENTRY",
            field_violations=bad,
        )


class AuditLog:
    """The append-only, tamper-evident log over an ``AuditStore``."""

    def __init__(
        self,
        store: AuditStore,
        signer: NoteSigner | None,
        origin: str,
        *,
        max_entry_bytes: int = 64 * 1024,
        commit_batch: int = 1024,
        verifier: NoteVerifier | None = None,
        linger: float = 0.008,
    ) -> None:
        self.store = store
        self.signer = signer
        if verifier is None:
            if signer is None:
                raise ValueError("an audit log needs a signer or a verifier")
            verifier = signer.verifier
        #: Checks the stored checkpoints; readers without the signing key use one alone.
        self.verifier = verifier
        self.origin = origin
        self.max_entry_bytes = max_entry_bytes
        self.commit_batch = commit_batch
        self._queue: list[_Pending] = []
        self._inflight: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._frontier: merkle.Frontier | None = None
        self._latest: SignedCheckpoint | None = None
        self._closed = False
        #: Groups committed by this process (for tests and metrics).
        self.commits = 0
        #: Seconds the committer waits at most for company under concurrency.
        self.linger = linger
        self._busy = False

    # -- appends ------------------------------------------------------------

    async def append(self, entry: audit_pb2.AuditEntry, request_id: str) -> Appended:
        """Append ``entry`` once per ``request_id``; return when it is stored."""
        validate_entry(entry, request_id)
        fingerprint = _fingerprint(entry)
        pending = self._inflight.get(request_id)
        if pending is not None:
            self._same_request(request_id, fingerprint, pending.fingerprint)
            follower: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
            pending.followers.append(follower)
            return await follower
        data, attrs, time_us = self._document(entry)
        if self._closed:
            raise Unavailable("the audit log is shutting down", retry_delay=1.0)
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        item = _Pending(
            data, attrs, request_id, fingerprint, time_us, future, [], entry.service, entry.outcome
        )
        self._inflight[request_id] = item
        self._queue.append(item)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="audit-committer")
        # Shielded: a caller that goes away must not cancel a group others wait on.
        return await asyncio.shield(future)

    async def append_many(
        self, items: Sequence[tuple[audit_pb2.AuditEntry, str]]
    ) -> list[Appended]:
        """Append ``(entry, request_id)`` pairs in order; return when all are stored.

        Every entry is validated before any is queued, so a bad one appends
        nothing; they join the group commit together, so a batch is usually
        one commit (a batch larger than ``commit_batch`` spans several, still
        in order).
        """
        if len(items) > MAX_BATCH:
            raise InvalidArgument(
                f"at most {MAX_BATCH} entries per batch, got {len(items)}",
                reason="BATCH_TOO_LARGE",
                field_violations=[FieldViolation("requests", f"at most {MAX_BATCH} entries")],
            )
        docs = []
        for at, (entry, request_id) in enumerate(items):
            try:
                validate_entry(entry, request_id)
                docs.append((self._document(entry), _fingerprint(entry)))
            except InvalidArgument as err:
                raise InvalidArgument(
                    f"requests[{at}]: {err.message}",
                    reason=err.reason,
                    field_violations=[
                        FieldViolation(f"requests[{at}].{v.field}", v.description)
                        for v in err.field_violations
                    ],
                ) from None
        if self._closed:
            raise Unavailable("the audit log is shutting down", retry_delay=1.0)
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[Appended]] = []
        seen: dict[str, str] = {}
        for (entry, request_id), ((data, attrs, time_us), fingerprint) in zip(
            items, docs, strict=True
        ):
            pending = self._inflight.get(request_id)
            if request_id in seen:
                self._same_request(request_id, fingerprint, seen[request_id])
            if pending is not None:
                self._same_request(request_id, fingerprint, pending.fingerprint)
                follower: asyncio.Future[Appended] = loop.create_future()
                pending.followers.append(follower)
                waits.append(follower)
                continue
            seen[request_id] = fingerprint
            future: asyncio.Future[Appended] = loop.create_future()
            item = _Pending(
                data,
                attrs,
                request_id,
                fingerprint,
                time_us,
                future,
                [],
                entry.service,
                entry.outcome,
            )
            self._inflight[request_id] = item
            self._queue.append(item)
            waits.append(future)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="audit-committer")
        return list(await asyncio.shield(asyncio.gather(*waits)))

    def _document(self, entry: audit_pb2.AuditEntry) -> tuple[bytes, dict[str, str], int]:
        """The entry's canonical bytes (index aside), index attributes and time, size-checked."""
        if entry.index or not entry.HasField("time"):
            # A copy: the caller's message is not ours to change.
            entry = audit_pb2.AuditEntry.FromString(entry.SerializeToString())
            entry.ClearField("index")  # output only
            if not entry.HasField("time"):
                entry.time.FromNanoseconds(time.time_ns() // 1000 * 1000)
        time_us = entry.time.ToMicroseconds()
        doc = entry_json(entry)
        try:
            data = canonical_json(doc)
        except ValueError as err:
            raise InvalidArgument(
                f"the entry is not representable as JSON: {err}",
                reason="INVALID_ENTRY",
                field_violations=[FieldViolation("entry.details", str(err))],
            ) from None
        size = len(data) + 32  # room for the index added at commit
        if size > self.max_entry_bytes:
            raise InvalidArgument(
                f"the entry is {size} bytes in canonical form; the limit is {self.max_entry_bytes}",
                reason="ENTRY_TOO_LARGE",
                field_violations=[
                    FieldViolation("entry", f"larger than {self.max_entry_bytes} bytes")
                ],
                metadata={"limit": str(self.max_entry_bytes), "size": str(size)},
            )
        return data, _attrs(doc), time_us

    @staticmethod
    def _same_request(
        request_id: str, fingerprint: str, original: str, index: int | None = None
    ) -> None:
        if fingerprint != original:
            raise InvalidArgument(
                f"request_id {request_id!r} was already used for a different entry",
                reason="REQUEST_ID_REUSED",
                field_violations=[
                    FieldViolation("request_id", "already used for a different entry")
                ],
                # The entry that holds the id: a writer that derives request ids
                # from its own retries (the mesh's outbox) reads this as "recorded".
                metadata={} if index is None else {"index": str(index)},
            )

    async def _drop_replays(self, batch: list[_Pending]) -> list[_Pending]:
        """Answer the requests whose id is already in the log with their original entry.

        One round trip for the whole group; the commit script re-checks, so a
        request another replica commits meanwhile is still caught.
        """
        seen = await self.store.requests([p.request_id for p in batch])
        if not seen:
            return batch
        # A replay is acknowledged like a commit: only once replicas have it.
        await self.store.confirm_replicated("the replayed entries")
        data = await self.store.entries(sorted({index for index, _ in seen.values()}))
        checkpoint = await self.checkpoint()
        rest = []
        for p in batch:
            if p.request_id not in seen:
                rest.append(p)
                continue
            index, original = seen[p.request_id]
            try:
                self._same_request(p.request_id, p.fingerprint, original, index)
                if index not in data:
                    raise DataLoss(
                        f"entry {index} of request {p.request_id!r} is missing from the log"
                    )
            except Exception as err:
                self._settle(p, None, err)
                continue
            leaf = merkle.leaf_hash(data[index])
            self._settle(p, Appended(index, leaf, checkpoint, replayed=True), None)
        return rest

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let the calls that are already runnable queue their entries
            # first: without this the committer wakes on the first append of
            # a burst and commits it alone (measured: 1.3 entries a commit
            # with 32 gRPC writers). Under concurrency (the last group had
            # company, or more came while it committed) it lingers a little longer, so grpc.aio's poller can
            # hand over the requests already on the wire; a lone writer
            # never waits.
            await asyncio.sleep(0)
            while self._queue:
                # Only a thin queue waits: a relay's batch is a group already.
                if (
                    self.linger
                    and len(self._queue) < LINGER_BELOW
                    and (self._busy or len(self._queue) > 1)
                ):
                    await self._gather()
                batch = self._queue[: self.commit_batch]
                del self._queue[: self.commit_batch]
                await self._commit(batch)
                # Busy: this group had company, or more came while it committed.
                self._busy = len(batch) > 1 or bool(self._queue)
            if self._closed:
                return

    async def _gather(self) -> None:
        """Wait while appends keep arriving (a millisecond at a time, ``linger`` at most)."""
        end = time.monotonic() + self.linger
        while len(self._queue) < self.commit_batch and time.monotonic() < end:
            before = len(self._queue)
            await asyncio.sleep(LINGER_STEP)
            if len(self._queue) == before:
                return  # nobody came in a step: commit what there is

    async def _commit(self, batch: list[_Pending]) -> None:
        """Write ``batch`` as one group; settle every future, never raise."""
        try:
            # Optimistic: the commit script refuses a group holding a request
            # id already in the log ('dup'), and only then are the replays
            # looked up, so a fresh group costs one round trip, not two.
            for _ in range(8):
                if not batch:
                    return
                try:
                    await self._try_commit(batch)
                    return
                except CommitConflict as conflict:
                    self._frontier = None
                    if conflict.kind == "dup":
                        batch = await self._drop_replays(batch)
                    elif conflict.kind == "key":
                        self.check_key(conflict.value)
            raise Aborted("the audit log kept changing under this append; retry", retry_delay=0.1)
        except redis.exceptions.ConnectionError as err:
            self._frontier = None
            self._fail(batch, Unavailable(f"Redis is unreachable: {err}", retry_delay=1.0))
        except Exception as err:
            self._frontier = None
            self._fail(batch, err)

    def _settle(self, p: _Pending, result: Appended | None, err: BaseException | None) -> None:
        if self._inflight.get(p.request_id) is p:
            del self._inflight[p.request_id]
        for fut in (p.future, *p.followers):
            if fut.done():
                continue
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

    def _fail(self, batch: list[_Pending], err: BaseException) -> None:
        for p in batch:
            self._settle(p, None, err)

    async def _try_commit(self, batch: list[_Pending]) -> None:
        frontier = self._frontier or await self._load()
        start = frontier.size
        grown = frontier.copy()
        prepared: list[Prepared] = []
        nodes: list[tuple[merkle.Node, bytes]] = []
        leaves: list[bytes] = []
        for offset, p in enumerate(batch):
            index = start + offset
            data = with_index(p.data, index)
            leaf = merkle.leaf_hash(data)
            leaves.append(leaf)
            nodes += grown.append(leaf)
            prepared.append(Prepared(index, data, p.request_id, p.fingerprint, p.time_us, p.attrs))
        signed = self._sign(grown)
        events = self._events(batch, start) if self.store.events_key else b""
        await self.store.commit(
            start, prepared, nodes, signed.note, signed.time_ns, self.verifier.vkey(), events
        )
        self._frontier = grown
        self._latest = signed
        self.commits += 1
        for p, item, leaf in zip(batch, prepared, leaves, strict=True):
            self._settle(p, Appended(item.index, leaf, signed), None)

    @staticmethod
    def _events(batch: list[_Pending], start: int) -> bytes:
        """The group's EntryAppended events, committed with it."""
        out = []
        for offset, p in enumerate(batch):
            index = start + offset
            payload = audit_events_pb2.EntryAppended(
                index=index,
                type=p.attrs.get("type", ""),
                service=p.service,
                outcome=p.outcome,  # type: ignore[arg-type]
            )
            out.append(
                make_event(
                    payload,
                    source="//autoecoops/kernel/policy-audit",
                    subject=str(index),
                    resource=f"audit/entries/{index}",
                    key=f"audit.entry.appended:{index}:{p.request_id}",
                )
            )
        return pack_events(out)

    def _sign(self, frontier: merkle.Frontier) -> SignedCheckpoint:
        if self.signer is None:
            raise FailedPrecondition("this audit log is open read-only (no signing key)")
        body = CheckpointBody(self.origin, frontier.size, frontier.root())
        return SignedCheckpoint(body, self.signer.sign(body.text()), time.time_ns())

    async def _load(self) -> merkle.Frontier:
        """Rebuild the frontier from Redis and check it against the stored checkpoint."""
        head = await self.store.head()
        self.check_key(head.vkey)
        hashes = await self.store.nodes(merkle.Frontier.nodes_for(head.size))
        if any(not h for h in hashes):
            raise DataLoss(
                f"tree nodes of the audit log (size {head.size}) are missing; run `autoecoops audit verify`"
            )
        frontier = merkle.Frontier.from_nodes(head.size, hashes)
        if head.note:
            body = CheckpointBody.parse(self.verifier.open(head.note))
            if body.size != head.size or body.root_hash != frontier.root():
                raise DataLoss(
                    "the stored tree does not match the latest signed checkpoint; "
                    "run `autoecoops audit verify`"
                )
            self._latest = SignedCheckpoint(body, head.note, head.time_ns)
        self._frontier = frontier
        return frontier

    def check_key(self, stored_vkey: str) -> None:
        """Raise FailedPrecondition SIGNING_KEY_MISMATCH unless the log is signed by our key."""
        vkey = self.verifier.vkey()
        if stored_vkey and stored_vkey != vkey:
            raise FailedPrecondition(
                f"the audit log in Redis is signed by {stored_vkey}, not by this service's key "
                f"{vkey}; start with the original key file (AUTOECOOPS_POLICY_AUDIT_SIGNING_KEY_FILE)",
                reason="SIGNING_KEY_MISMATCH",
                metadata={"log_key": stored_vkey, "service_key": vkey},
            )

    async def close(self) -> None:
        """Commit what is queued, then stop the committer."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    # -- checkpoints and proofs ----------------------------------------------

    async def checkpoint(self) -> SignedCheckpoint:
        """The latest signed checkpoint (a fresh one for an empty log)."""
        head = await self.store.head()
        self.check_key(head.vkey)
        if not head.note:
            return self._sign(merkle.Frontier())
        latest = self._latest
        if latest is not None and latest.note == head.note:
            return latest
        body = CheckpointBody.parse(self.verifier.open(head.note))
        return SignedCheckpoint(body, head.note, head.time_ns)

    async def size(self) -> int:
        """The number of entries."""
        return (await self.store.head()).size

    async def _tree_size(self, requested: int, field: str) -> int:
        _not_negative(field, requested)
        size = await self.size()
        if requested > size:
            raise _past_the_log(field, requested, size, f"must be at most {size}")
        return requested or size

    async def _prove(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        nodes = merkle.proof_nodes(ranges)
        hashes = await self.store.nodes(nodes)
        if any(not h for h in hashes):
            raise DataLoss("tree nodes are missing from the store; run `autoecoops audit verify`")
        return merkle.assemble(ranges, hashes)

    async def inclusion_proof(self, index: int, tree_size: int = 0) -> tuple[int, list[bytes]]:
        """(size, audit path) of entry ``index`` in the tree of ``tree_size`` (0: latest)."""
        _not_negative("index", index)
        size = await self._tree_size(tree_size, "tree_size")
        if index >= size:
            raise _past_the_log("index", index, size, f"must be less than {size}")
        return size, await self._prove(merkle.inclusion_ranges(index, size))

    async def consistency_proof(self, old_size: int, new_size: int = 0) -> tuple[int, list[bytes]]:
        """(new size, proof) that the tree of ``old_size`` is a prefix of ``new_size``'s."""
        _not_negative("old_size", old_size)
        new = await self._tree_size(new_size, "new_size")
        if old_size > new:
            raise _past_the_log("old_size", old_size, new, f"must be at most new_size ({new})")
        return new, await self._prove(merkle.consistency_ranges(old_size, new))

    async def root_at(self, size: int) -> bytes:
        """The root hash of the tree of ``size`` (from stored nodes)."""
        if size == 0:
            return merkle.EMPTY_ROOT
        hashes = await self._prove([(0, size)])
        return hashes[0]

    # -- reads --------------------------------------------------------------

    async def entry(self, index: int) -> StoredEntry:
        """Entry ``index`` with its exact bytes."""
        _not_negative("index", index)
        size = await self.size()
        if index >= size:
            raise _past_the_log("index", index, size, f"must be less than {size}")
        data = await self.store.entry(index)
        if data is None:
            raise DataLoss(
                f"entry {index} is missing from the store; run `autoecoops audit verify`"
            )
        return StoredEntry(parse_entry(data), data, merkle.leaf_hash(data))

    async def entries(self, indexes: Sequence[int]) -> list[StoredEntry]:
        """Several entries (ones missing from the store are left out)."""
        got = await self.store.entries(indexes)
        return [
            StoredEntry(parse_entry(got[i]), got[i], merkle.leaf_hash(got[i]))
            for i in indexes
            if i in got
        ]

    async def list_entries(
        self, flt: EntryFilter, page_size: int, page_token: str
    ) -> tuple[list[audit_pb2.AuditEntry], str]:
        """One page of entries in index order, and the next page's token ('' on the last)."""
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                field_violations=[FieldViolation("page_size", "must not be negative")],
            )
        limit = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        after = _decode_token(page_token)
        size = await self.size()
        budget = limit * SCAN_FACTOR
        attr = next(
            (
                (kind, value)
                for kind, value in (
                    ("type", flt.type),
                    ("actor", flt.actor),
                    ("resource", flt.resource),
                    ("trace", flt.trace_id),
                )
                if value
            ),
            None,
        )
        if attr is not None:
            candidates = await self.store.by_attr(attr[0], attr[1], after, budget)
            exhausted = len(candidates) < budget
        elif flt.start_us is not None or flt.end_us is not None:
            lo = flt.start_us if flt.start_us is not None else float("-inf")
            hi = flt.end_us if flt.end_us is not None else float("inf")
            matched = [i for i in await self.store.by_time(lo, hi) if i > after]
            candidates, exhausted = matched[:budget], len(matched) <= budget
        else:
            candidates = list(range(after + 1, min(size, after + 1 + limit)))
            exhausted = after + 1 + limit >= size
        candidates = [i for i in candidates if i < size]
        out: list[audit_pb2.AuditEntry] = []
        last = after
        for chunk_at in range(0, len(candidates), 500):
            chunk = candidates[chunk_at : chunk_at + 500]
            for stored in await self.entries(chunk):
                last = stored.entry.index
                if _matches(stored.entry, flt):
                    out.append(stored.entry)
                    if len(out) == limit:
                        more = last < candidates[-1] or not exhausted
                        return out, _encode_token(last) if more else ""
            last = chunk[-1]
        return out, "" if exhausted else _encode_token(last)


def _not_negative(field: str, value: int) -> None:
    """INVALID_ARGUMENT for a negative index or size: the same answer from every read."""
    if value < 0:
        raise InvalidArgument(
            f"{field} must not be negative (got {value})",
            reason="NEGATIVE_NUMBER",
            field_violations=[FieldViolation(field, "must not be negative")],
        )


def _past_the_log(field: str, value: int, size: int, rule: str) -> OutOfRange:
    """OUT_OF_RANGE for an index or size past the log (or past the other size)."""
    return OutOfRange(
        f"{field} {value} is out of range: {rule}",
        reason="PAST_TREE_SIZE",
        field_violations=[FieldViolation(field, rule)],
        metadata={"tree_size": str(size)},
    )


def _attrs(doc: dict[str, Any]) -> dict[str, str]:
    attrs = {
        "type": doc.get("type", ""),
        "actor": (doc.get("actor") or {}).get("subject", ""),
        "resource": doc.get("resource", ""),
        "trace": doc.get("traceId", ""),
    }
    return {k: v for k, v in attrs.items() if v}


def _matches(entry: audit_pb2.AuditEntry, flt: EntryFilter) -> bool:
    if flt.type and entry.type != flt.type:
        return False
    if flt.actor and entry.actor.subject != flt.actor:
        return False
    if flt.resource and entry.resource != flt.resource:
        return False
    if flt.trace_id and entry.trace_id != flt.trace_id:
        return False
    us = entry.time.ToMicroseconds()
    if flt.start_us is not None and us < flt.start_us:
        return False
    return not (flt.end_us is not None and us >= flt.end_us)


def _encode_token(after: int) -> str:
    return base64.urlsafe_b64encode(f"a{after}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    if not token:
        return -1
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if raw[:1] != "a":
            raise ValueError(raw)
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "page_token is not a token this service issued",
            field_violations=[FieldViolation("page_token", "not a valid page token")],
        ) from None


def timestamp_us(ts: timestamp_pb2.Timestamp) -> int:
    """Microseconds since the epoch of a Timestamp."""
    return int(ts.ToMicroseconds())
