"""Policy decisions: evaluating a path for an input, and the decision log.

Every decision becomes an audit entry of type ``policy.decision`` with the
decision id, bundle and revision, path, input and result (with the bundle's
JSON pointers removed), the caller, the trace id and the time. By default
the entry is appended by a background task through the log's group commit,
as OPA's decision logger does, so a decision costs the policy evaluation and
not a Redis round trip; ``decision_log_sync`` makes Evaluate wait instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from autoecoops.audit.v1 import audit_pb2
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import FailedPrecondition, FieldViolation, InvalidArgument
from autoecoops.kernel.policy_audit.bundles import BundleRegistry
from autoecoops.kernel.policy_audit.engine import Decision, EvaluationError, check_path
from autoecoops.kernel.policy_audit.trail import AuditLog

log = logging.getLogger("autoecoops.policy_audit")

DECISION_TYPE = "policy.decision"


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def mask(doc: dict[str, Any], pointers: Sequence[str]) -> list[str]:
    """Remove the values at JSON pointers (RFC 6901) from ``doc``; return those removed."""
    erased = []
    for pointer in pointers:
        tokens = [_unescape(t) for t in pointer.split("/")[1:]]
        parent: Any = doc
        for token in tokens[:-1]:
            parent = _child(parent, token)
            if parent is None:
                break
        if parent is None or not tokens:
            continue
        last = tokens[-1]
        if isinstance(parent, dict) and last in parent:
            del parent[last]
            erased.append(pointer)
        elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
            del parent[int(last)]
            erased.append(pointer)
    return erased


def _child(node: Any, token: str) -> Any:
    if isinstance(node, dict):
        return node.get(token)
    if isinstance(node, list) and token.isdigit() and int(token) < len(node):
        return node[int(token)]
    return None


def allowed(decision: Decision) -> bool:
    """True when the result is ``true``, or an object whose ``allow`` is ``true``."""
    value = decision.value
    return decision.defined and (
        value is True or (isinstance(value, dict) and value.get("allow") is True)
    )


def identity(principal: Principal) -> dict[str, Any]:
    """The verified caller as policies see it in ``input.identity``."""
    return {
        "sub": principal.subject,
        "iss": principal.issuer,
        "roles": list(principal.roles),
        "groups": list(principal.groups),
        "act": list(principal.actors),
        "claims": dict(principal.claims),
    }


@dataclass
class DecisionRecord:
    """What the decision log keeps about one decision, before masking."""

    decision_id: str
    path: str
    bundle: str
    revision: str
    masks: tuple[str, ...]
    input: dict[str, Any]
    decision: Decision
    principal: Principal | None
    trace_id: str
    time_ns: int = field(default_factory=time.time_ns)

    def entry(self) -> audit_pb2.AuditEntry:
        """The audit entry, with the masks applied."""
        # A copy: masking must not reach into a document the caller may still hold.
        doc: dict[str, Any] = {"input": copy.deepcopy(self.input)}
        if self.decision.defined:
            doc["result"] = copy.deepcopy(self.decision.value)
        erased = mask(doc, self.masks)
        details: dict[str, Any] = {
            "decision_id": self.decision_id,
            "path": self.path,
            "bundle": self.bundle,
            "bundle_revision": self.revision,
            "defined": self.decision.defined,
            "allowed": allowed(self.decision),
            "input": doc.get("input"),
        }
        if "result" in doc:
            details["result"] = doc["result"]
        if erased:
            details["erased"] = erased
        entry = audit_pb2.AuditEntry(
            type=DECISION_TYPE,
            service="policy-audit",
            action="policy.evaluate",
            resource=f"policy/data/{self.path}",
            outcome=audit_pb2.OUTCOME_SUCCESS,
            trace_id=self.trace_id,
            decision_id=self.decision_id,
        )
        entry.time.FromNanoseconds(self.time_ns // 1000 * 1000)
        if self.principal is not None:
            entry.actor.CopyFrom(
                envelope_pb2.Actor(
                    subject=self.principal.subject,
                    issuer=self.principal.issuer,
                    actors=list(self.principal.actors),
                )
            )
        json_format.ParseDict(details, entry.details)
        return entry


class DecisionLogger:
    """Appends decision records to the audit log, in the background or synchronously."""

    def __init__(self, audit: AuditLog, buffer: int = 10_000, sync: bool = False) -> None:
        self.audit = audit
        self.sync = sync
        self._queue: asyncio.Queue[DecisionRecord] = asyncio.Queue(maxsize=buffer)
        self._task: asyncio.Task[None] | None = None
        #: Decisions that could not be appended after retries (logged as errors).
        self.dropped = 0

    async def record(self, rec: DecisionRecord) -> None:
        """Log ``rec``: now when sync, else queue it (waiting for room when full)."""
        if self.sync:
            await self.audit.append(rec.entry(), rec.decision_id)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="decision-log")
        try:
            self._queue.put_nowait(rec)
        except asyncio.QueueFull:
            await self._queue.put(rec)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while not self._queue.empty() and len(batch) < 4096:
                batch.append(self._queue.get_nowait())
            await self._append(batch)
            for _ in batch:
                self._queue.task_done()

    async def _append(self, batch: list[DecisionRecord]) -> None:
        pending = batch
        for attempt in range(5):
            results = await asyncio.gather(
                *(self.audit.append(r.entry(), r.decision_id) for r in pending),
                return_exceptions=True,
            )
            failed = [
                r for r, res in zip(pending, results, strict=True) if isinstance(res, BaseException)
            ]
            if not failed:
                return
            errors = {type(res).__name__ for res in results if isinstance(res, BaseException)}
            log.warning("decision log: %d appends failed (%s); retrying", len(failed), errors)
            pending = failed
            await asyncio.sleep(0.2 * 2**attempt)
        self.dropped += len(pending)
        log.error("decision log: %d decisions could not be appended", len(pending))

    async def flush(self) -> None:
        """Wait until every queued decision is appended (or given up on)."""
        if self._task is not None and not self._task.done():
            await self._queue.join()

    async def close(self) -> None:
        """Flush, then stop the background task."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True, slots=True)
class Evaluation:
    """An answered Evaluate."""

    decision_id: str
    decision: Decision
    bundle_revision: str


#: Paths already found valid (Evaluate sees the same few paths again and again).
_checked: dict[str, str | None] = {}


class Decider:
    """Evaluate: find the owning bundle, evaluate, log the decision."""

    def __init__(self, registry: BundleRegistry, logger: DecisionLogger) -> None:
        self.registry = registry
        self.logger = logger

    async def evaluate(
        self,
        path: str,
        input_doc: Mapping[str, Any] | None,
        principal: Principal | None = None,
        trace_id: str = "",
    ) -> Evaluation:
        """The value of ``data.<path>`` for the input, logged under a new decision id."""
        path = path.strip("/")
        why = _checked.get(path) if path in _checked else check_path(path)
        if why is None and len(_checked) < 10_000:
            _checked[path] = None
        if why:
            raise InvalidArgument(
                f"path {path!r}: {why}", field_violations=[FieldViolation("path", why)]
            )
        doc = dict(input_doc or {})
        if principal is not None:
            # Verified claims, never the caller's word for who it is.
            doc["identity"] = identity(principal)
        active = self.registry.owner(path)
        decision_id = os.urandom(16).hex()
        masks: tuple[str, ...] = ()
        if active is None:
            decision, bundle, revision = Decision(False), "", ""
        else:
            try:
                decision = active.compiled.evaluate(path, doc)
            except EvaluationError as err:
                raise FailedPrecondition(
                    str(err),
                    reason="POLICY_EVALUATION_ERROR",
                    metadata={"bundle": active.spec.name},
                ) from None
            bundle, revision, masks = active.spec.name, active.spec.revision, active.spec.masks
        await self.logger.record(
            DecisionRecord(
                decision_id, path, bundle, revision, masks, doc, decision, principal, trace_id
            )
        )
        return Evaluation(decision_id, decision, revision)


def value_to_input(value: struct_pb2.Value | None, present: bool) -> dict[str, Any]:
    """The input document from a request's Value: it must be a JSON object."""
    if not present or value is None:
        return {}
    if value.WhichOneof("kind") != "struct_value":
        kind = value.WhichOneof("kind") or "nothing"
        raise InvalidArgument(
            f"input must be a JSON object, not {kind.replace('_value', '')}",
            reason="INPUT_NOT_AN_OBJECT",
            field_violations=[FieldViolation("input", "must be a JSON object")],
        )
    result: dict[str, Any] = json_format.MessageToDict(value.struct_value)
    return result
