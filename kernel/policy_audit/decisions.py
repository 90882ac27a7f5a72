"""Policy decisions: evaluating a path for an input, and the decision log.

Every decision becomes an audit entry of type ``policy.decision`` with the
decision id, bundle and revision, path, input and result (with the bundle's
JSON pointers removed), the caller, the trace id and the time. It goes
through policy-audit's audit outbox like every other record (the mesh's
audit rule, kernel/mesh/outbox.py), so a decision is never dropped.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from autoecoops.audit.v1 import audit_pb2
from autoecoops.events.v1 import envelope_pb2, events_pb2
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import FailedPrecondition, FieldViolation, InvalidArgument
from autoecoops.kernel.mesh.outbox import Outbox, current_audit, make_event
from autoecoops.kernel.policy_audit.bundles import BundleRegistry
from autoecoops.kernel.policy_audit.engine import Decision, EvaluationError, check_path
from autoecoops.kernel.policy_audit.trail import AuditLog
from autoecoops.policy.v1 import events_pb2 as policy_events_pb2

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


def decision_event(entry: audit_pb2.AuditEntry) -> events_pb2.PublishRequest:
    """PolicyDecisionMade from a decision's (masked) log entry."""
    d = entry.details.fields
    payload = policy_events_pb2.PolicyDecisionMade(
        decision_id=entry.decision_id,
        path=d["path"].string_value if "path" in d else "",
        defined=d["defined"].bool_value if "defined" in d else False,
        allowed=d["allowed"].bool_value if "allowed" in d else False,
        bundle=d["bundle"].string_value if "bundle" in d else "",
        bundle_revision=d["bundle_revision"].string_value if "bundle_revision" in d else "",
    )
    if "result" in d:
        payload.result.CopyFrom(d["result"])
    if "input" in d:
        payload.input.CopyFrom(d["input"])
    return make_event(
        payload,
        source="//autoecoops/kernel/policy-audit",
        subject=entry.decision_id,
        resource=entry.resource,
        key=f"policy.decision.made:{entry.decision_id}",
    )


class DecisionLogger:
    """Commits decision records to policy-audit's audit outbox; its relay appends them.

    Evaluate is an audited RPC: its audit record *is* the decision record
    (it replaces the call's generic one), so the caller's answer comes once
    the decision is in the log. A decision made outside an RPC is committed
    to the outbox on its own. Either way it is in Redis before Evaluate
    answers, and the relay appends it when the log can take it: nothing is
    queued in memory, nothing is dropped.
    """

    def __init__(self, audit: AuditLog, outbox: Outbox | None = None) -> None:
        self.audit = audit
        self.outbox = outbox

    async def record(self, rec: DecisionRecord) -> None:
        """Log ``rec`` through the outbox (or straight to the log without one)."""
        request = audit_pb2.AppendEntryRequest(entry=rec.entry(), request_id=rec.decision_id)
        if self.outbox is None:
            await self.audit.append(request.entry, request.request_id)
            return
        event = decision_event(request.entry)
        ctx = current_audit.get()
        if ctx is not None and not ctx.staged:
            ctx.request = request
            ctx.events.append(event)
            return
        await self.outbox.add(request, [event])

    async def close(self) -> None:
        """Nothing is held here (the outbox is in Redis)."""


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
