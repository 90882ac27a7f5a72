"""The fleet: baselines, enrollment, nodes, evaluations and inventory, on the store.

This is the platform's logic; ``service.py`` only translates requests to
these calls, ``sessions.py`` carries commands to agents, ``store.py`` holds
the Redis code. Records are the contract's messages (they are what is
stored and served); the decisions (validation, scores, drift, selectors,
search) are the plain-Python modules beside this one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Sequence
from typing import Any

from google.protobuf import message

from autoecoops.kernel.mesh.audit import AuditTrail
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.context import MemoryContext
from autoecoops.kernel.mesh.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from autoecoops.kernel.mesh.paging import page_by_key
from autoecoops.machineops.v1 import events_pb2 as ev
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.platforms.machine_ops import compliance, convert, inventory
from autoecoops.platforms.machine_ops.events import BusPublisher, NodeIdentities
from autoecoops.platforms.machine_ops.importer import parse_controls
from autoecoops.platforms.machine_ops.model import FAIL, check_id, id_of, validate_controls
from autoecoops.platforms.machine_ops.profile import BUILTIN_ID, builtin_baseline
from autoecoops.platforms.machine_ops.selectors import check_labels, matches, parse_selector
from autoecoops.platforms.machine_ops.settings import MachineOpsSettings
from autoecoops.platforms.machine_ops.store import MachineStore

MAX_NODE_ID = 58  # the identity "node.<id>" must fit auth's 63-character names
_BASELINE_FIELDS = ("title", "description", "node_selector", "controls")


def _etag() -> str:
    return uuid.uuid4().hex[:16]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _evaluation_id(now: float, seq: int) -> str:
    # Inverted milliseconds: ascending ids are newest first, which is the
    # order ListEvaluations pages in.
    return f"{10**14 - int(now * 1000):014d}-{seq:08d}"


class Fleet:
    """Baselines, enrollment, nodes, evaluations and inventory of one installation."""

    def __init__(
        self,
        store: MachineStore,
        settings: MachineOpsSettings,
        *,
        identities: NodeIdentities | None,
        publisher: BusPublisher | None,
        audit: AuditTrail | None,
        context: MemoryContext | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.identities = identities
        self.publisher = publisher
        self.audit = audit
        self.context = context

    async def seed(self) -> None:
        """Create the built-in baseline when it is not there yet."""
        b = builtin_baseline()
        now = time.time()
        b.create_time = b.update_time = now
        b.etag = _etag()
        await self.store.create("baselines", BUILTIN_ID, convert.baseline_to_pb(b))

    # -- request-id replays ------------------------------------------------------

    async def replayed(self, rpc: str, request_id: str, cls: type[Any]) -> Any:
        """The response of an earlier call with ``request_id``, or None."""
        raw = await self.store.replay(rpc, request_id)
        return None if raw is None else cls.FromString(raw)

    # -- baselines ------------------------------------------------------------------

    async def create_baseline(self, baseline_id: str, b: pb.Baseline) -> pb.Baseline:
        """Store a new baseline (version 1)."""
        check_id(baseline_id, "baseline_id")
        domain = convert.baseline_from_pb(b)
        validate_controls(domain.controls)
        parse_selector(b.node_selector, "baseline.node_selector")
        now = time.time()
        domain.name = f"baselines/{baseline_id}"
        domain.version, domain.etag = 1, _etag()
        domain.create_time = domain.update_time = now
        stored = convert.baseline_to_pb(domain)
        if not await self.store.create("baselines", baseline_id, stored):
            raise AlreadyExists(
                f"baselines/{baseline_id} already exists",
                resource_type="Baseline",
                resource_name=domain.name,
            )
        return stored

    async def import_baseline(self, baseline_id: str, text: str) -> pb.Baseline:
        """Create or replace (as a new version) a baseline from InSpec-style YAML."""
        check_id(baseline_id, "baseline_id")
        meta, controls = parse_controls(text)
        parse_selector(meta.get("node_selector", ""), "yaml.node_selector")
        candidate = pb.Baseline()
        candidate.title = meta.get("title", "")
        candidate.description = meta.get("description", "")
        candidate.node_selector = meta.get("node_selector", "")
        candidate.controls.extend(convert.control_to_pb(c) for c in controls)

        async def upsert(old: pb.Baseline | None) -> pb.Baseline:
            now = time.time()
            new = pb.Baseline()
            new.CopyFrom(candidate)
            new.name = f"baselines/{baseline_id}"
            new.version = old.version + 1 if old else 1
            new.etag = _etag()
            new.create_time.CopyFrom(old.create_time if old else convert.ts(now))
            new.update_time.CopyFrom(convert.ts(now))
            return new

        stored = await self.store.replace("baselines", baseline_id, upsert, pb.Baseline)
        assert isinstance(stored, pb.Baseline)
        return stored

    async def get_baseline(self, name: str, field: str = "name") -> pb.Baseline:
        """A baseline by name; NOT_FOUND when absent."""
        bid = id_of(name, "baselines", field)
        found: pb.Baseline | None = await self.store.get("baselines", bid, pb.Baseline)
        if found is None:
            raise NotFound(f"{name} does not exist", resource_type="Baseline", resource_name=name)
        return found

    async def list_baselines(self, page_size: int, token: str) -> tuple[list[pb.Baseline], str]:
        """One page of baselines by name."""
        items = await self.store.all("baselines", pb.Baseline)
        return page_by_key(items, page_size, token, lambda b: b.name)

    async def update_baseline(self, b: pb.Baseline, mask: Sequence[str]) -> pb.Baseline:
        """Change the masked fields; a change of controls or selector bumps the version."""
        bid = id_of(b.name, "baselines", "baseline.name")
        paths = list(mask) or list(_BASELINE_FIELDS)
        bad = [p for p in paths if p not in _BASELINE_FIELDS]
        if bad:
            raise InvalidArgument(
                f"update_mask names fields that cannot be updated: {', '.join(bad)}",
                reason="INVALID_UPDATE_MASK",
                field_violations=[
                    FieldViolation("update_mask", f"{p} is not updatable") for p in bad
                ],
            )
        if "controls" in paths:
            validate_controls(convert.baseline_from_pb(b).controls)
        if "node_selector" in paths:
            parse_selector(b.node_selector, "baseline.node_selector")

        async def apply(old: pb.Baseline | None) -> pb.Baseline:
            if old is None:
                raise NotFound(
                    f"{b.name} does not exist", resource_type="Baseline", resource_name=b.name
                )
            if b.etag and b.etag != old.etag:
                raise Aborted(
                    f"{b.name} changed since etag {b.etag}",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": old.etag},
                )
            new = pb.Baseline()
            new.CopyFrom(old)
            for p in paths:
                if p == "controls":
                    del new.controls[:]
                    new.controls.extend(
                        convert.control_to_pb(convert.control_from_pb(c)) for c in b.controls
                    )
                else:
                    setattr(new, p, getattr(b, p))
            if any(p in ("controls", "node_selector") for p in paths):
                new.version = old.version + 1
            new.etag = _etag()
            new.update_time.CopyFrom(convert.ts(time.time()))
            return new

        stored = await self.store.replace("baselines", bid, apply, pb.Baseline)
        assert isinstance(stored, pb.Baseline)
        return stored

    async def delete_baseline(self, name: str, etag: str) -> None:
        """Delete a baseline (NOT_FOUND when absent; ABORTED on a stale etag)."""
        bid = id_of(name, "baselines")

        async def drop(old: pb.Baseline | None) -> None:
            if old is None:
                raise NotFound(
                    f"{name} does not exist", resource_type="Baseline", resource_name=name
                )
            if etag and etag != old.etag:
                raise Aborted(f"{name} changed since etag {etag}", reason="ETAG_MISMATCH")
            return None

        await self.store.replace("baselines", bid, drop, pb.Baseline)

    async def baselines_for(
        self, labels: dict[str, str], names: Sequence[str] = ()
    ) -> list[pb.Baseline]:
        """The baselines named, or every baseline whose selector matches ``labels``."""
        if names:
            return [await self.get_baseline(n, "baselines") for n in names]
        out = []
        for b in await self.store.all("baselines", pb.Baseline):
            try:
                if matches(parse_selector(b.node_selector), labels):
                    out.append(b)
            except InvalidArgument:
                continue
        return sorted(out, key=lambda b: b.name)

    # -- enrollment -------------------------------------------------------------------

    async def create_enrollment_token(
        self, token_id: str, t: pb.EnrollmentToken
    ) -> tuple[pb.EnrollmentToken, str]:
        """A new one-time enrollment token and its secret."""
        check_id(token_id, "enrollment_token_id")
        node_id = check_id(t.node_id, "enrollment_token.node_id")
        if len(node_id) > MAX_NODE_ID:
            raise InvalidArgument(
                "node_id is too long",
                field_violations=[
                    FieldViolation("enrollment_token.node_id", f"at most {MAX_NODE_ID} characters")
                ],
            )
        check_labels(t.labels, "enrollment_token.labels")
        ttl = (
            t.ttl.ToTimedelta().total_seconds()
            if t.HasField("ttl")
            else self.settings.enrollment_ttl
        )
        if not 0 < ttl <= self.settings.max_enrollment_ttl:
            raise InvalidArgument(
                "ttl must be positive and at most 7 days",
                field_violations=[FieldViolation("enrollment_token.ttl", "between 1s and 7 days")],
            )
        now = time.time()
        stored = pb.EnrollmentToken(
            name=f"enrollmentTokens/{token_id}",
            node_id=node_id,
            labels=dict(t.labels),
            state=pb.ENROLLMENT_TOKEN_STATE_ACTIVE,
        )
        stored.expire_time.CopyFrom(convert.ts(now + ttl))
        stored.create_time.CopyFrom(convert.ts(now))
        secret = f"{token_id}.{secrets.token_urlsafe(32)}"
        if not await self.store.create("tokens", token_id, stored):
            raise AlreadyExists(f"enrollmentTokens/{token_id} already exists")
        await self.store.put_secret_hash(token_id, _digest(secret))
        return stored, secret

    @staticmethod
    def _state(t: pb.EnrollmentToken, now: float) -> pb.EnrollmentToken:
        if t.state == pb.ENROLLMENT_TOKEN_STATE_ACTIVE and convert.seconds(t.expire_time) <= now:
            t.state = pb.ENROLLMENT_TOKEN_STATE_EXPIRED
        return t

    async def list_enrollment_tokens(
        self, page_size: int, token: str
    ) -> tuple[list[pb.EnrollmentToken], str]:
        """One page of enrollment tokens (with their current state)."""
        now = time.time()
        items = [self._state(t, now) for t in await self.store.all("tokens", pb.EnrollmentToken)]
        return page_by_key(items, page_size, token, lambda t: t.name)

    async def revoke_enrollment_token(self, name: str) -> pb.EnrollmentToken:
        """Revoke an unused token (idempotent); FAILED_PRECONDITION once used."""
        tid = id_of(name, "enrollmentTokens")

        async def revoke(old: pb.EnrollmentToken | None) -> pb.EnrollmentToken:
            if old is None:
                raise NotFound(
                    f"{name} does not exist", resource_type="EnrollmentToken", resource_name=name
                )
            if old.state == pb.ENROLLMENT_TOKEN_STATE_USED:
                raise FailedPrecondition(
                    f"{name} was already used to enroll {old.node_id}", reason="TOKEN_USED"
                )
            old.state = pb.ENROLLMENT_TOKEN_STATE_REVOKED
            return old

        stored = await self.store.replace("tokens", tid, revoke, pb.EnrollmentToken)
        assert isinstance(stored, pb.EnrollmentToken)
        return stored

    async def enroll(
        self, node_id: str, secret: str, agent_version: str
    ) -> tuple[pb.Node, str, str]:
        """Spend an enrollment secret: the node (created or re-keyed) and its new identity."""
        denied = PermissionDenied(
            "the enrollment secret is not valid for this node", reason="ENROLLMENT_DENIED"
        )
        token_id = secret.split(".", 1)[0]
        expected = await self.store.secret_hash(token_id) if token_id else None
        if expected is None or not hmac.compare_digest(expected, _digest(secret)):
            raise denied
        token: pb.EnrollmentToken | None = await self.store.get(
            "tokens", token_id, pb.EnrollmentToken
        )
        if token is None or token.node_id != node_id:
            raise denied
        now = time.time()
        state = self._state(token, now).state
        if state != pb.ENROLLMENT_TOKEN_STATE_ACTIVE:
            reason = pb.EnrollmentTokenState.Name(state).removeprefix("ENROLLMENT_TOKEN_STATE_")
            raise PermissionDenied(
                f"the enrollment token is {reason.lower()}", reason=f"TOKEN_{reason}"
            )
        if self.identities is None:
            raise FailedPrecondition(
                "no auth-service to create node identities with", reason="NO_IDENTITY_PROVIDER"
            )
        client_id, client_secret = await self.identities.create(node_id)

        async def spend(old: pb.EnrollmentToken | None) -> pb.EnrollmentToken:
            if (
                old is None
                or self._state(old, time.time()).state != pb.ENROLLMENT_TOKEN_STATE_ACTIVE
            ):
                raise denied
            old.state = pb.ENROLLMENT_TOKEN_STATE_USED
            return old

        try:
            await self.store.replace("tokens", token_id, spend, pb.EnrollmentToken)
        except PermissionDenied:
            await self.identities.delete(node_id)  # lost a race for the same secret
            raise

        async def upsert(old: pb.Node | None) -> pb.Node:
            node = old or pb.Node(name=f"nodes/{node_id}")
            if old is None:
                node.create_time.CopyFrom(convert.ts(now))
            node.labels.update(token.labels)
            node.identity = client_id
            node.agent_version = agent_version
            node.etag = _etag()
            node.update_time.CopyFrom(convert.ts(now))
            return node

        node = await self.store.replace("nodes", node_id, upsert, pb.Node)
        assert isinstance(node, pb.Node)
        if self.publisher is not None:
            await self.publisher.publish(
                ev.AgentEnrolled(
                    node=node.name,
                    identity=client_id,
                    enrollment_token=token.name,
                    agent_version=agent_version,
                    enroll_time=convert.ts(now),
                ),
                subject=node.name,
                key=f"enrolled:{token.name}",
            )
        return await self.decorate(node), client_id, client_secret

    # -- nodes ---------------------------------------------------------------------------

    async def node_record(self, name: str, field: str = "name") -> pb.Node:
        """A node's stored record; NOT_FOUND when absent."""
        nid = id_of(name, "nodes", field)
        node: pb.Node | None = await self.store.get("nodes", nid, pb.Node)
        if node is None:
            raise NotFound(f"{name} does not exist", resource_type="Node", resource_name=name)
        return node

    async def decorate(
        self,
        node: pb.Node,
        sessions: dict[str, str] | None = None,
        seen: dict[str, float] | None = None,
        baselines: list[pb.Baseline] | None = None,
        status: dict[str, str] | None = None,
    ) -> pb.Node:
        """Fill a node's output-only fields from the session registry, evaluations and baselines."""
        nid = node.name.split("/", 1)[1]
        out = pb.Node()
        out.CopyFrom(node)
        connected = nid in (sessions if sessions is not None else await self.store.sessions())
        out.connected = connected
        st = status if status is not None else (await self.store.statuses([nid]))[nid]
        if "score" in st:
            out.compliance_score = float(st["score"])
            out.last_evaluation = st.get("evaluation", "")
        out.os_version = st.get("os_version", "")
        out.agent_version = st.get("agent_version", out.agent_version)
        out.agent_root = bool(st.get("agent_root"))
        out.kernel_version = st.get("kernel_version", "")
        last = (seen if seen is not None else await self.store.last_seen()).get(nid)
        if last:
            out.last_seen_time.CopyFrom(convert.ts(last))
        pool = (
            baselines if baselines is not None else await self.store.all("baselines", pb.Baseline)
        )
        out.baselines.extend(
            sorted(b.name for b in pool if _selects(b.node_selector, dict(node.labels)))
        )
        conds = [
            convert.condition(
                "Connected", connected, "SessionOpen" if connected else "NoSession", "", last or 0
            )
        ]
        if out.HasField("compliance_score"):
            compliant = out.compliance_score >= 100.0
            conds.append(
                convert.condition(
                    "Compliant",
                    compliant,
                    "AllControlsPass" if compliant else "ControlsFailed",
                    f"score {out.compliance_score:.1f}",
                    0,
                    "" if compliant else "medium",
                )
            )
        out.conditions.extend(conds)
        return out

    async def get_node(self, name: str) -> pb.Node:
        """A node with its output-only fields."""
        return await self.decorate(await self.node_record(name))

    async def list_nodes(
        self, page_size: int, token: str, selector: str, terms: str = ""
    ) -> tuple[list[pb.Node], str]:
        """One page of nodes matching a label selector (and inventory filter terms)."""
        sel = parse_selector(selector)
        parsed = inventory.parse_filter(terms) if terms else ()
        nodes = [n for n in await self.store.all("nodes", pb.Node) if matches(sel, dict(n.labels))]
        if parsed:
            kept = []
            for n in nodes:
                tables, _ = await self.store.inventory(n.name.split("/", 1)[1])
                if inventory.matches(parsed, tables):
                    kept.append(n)
            nodes = kept
        page, nxt = page_by_key(nodes, page_size, token, lambda n: n.name)
        sessions, seen = await self.store.sessions(), await self.store.last_seen()
        pool = await self.store.all("baselines", pb.Baseline)
        statuses = await self.store.statuses([n.name.split("/", 1)[1] for n in page])
        return [
            await self.decorate(n, sessions, seen, pool, statuses[n.name.split("/", 1)[1]])
            for n in page
        ], nxt

    async def update_node(self, node: pb.Node, mask: Sequence[str]) -> pb.Node:
        """Change a node's labels (whole map, or ``labels.<key>`` entries); ABORTED on a stale etag."""
        nid = id_of(node.name, "nodes", "node.name")
        paths = list(mask) or ["labels"]
        bad = [p for p in paths if p != "labels" and not p.startswith("labels.")]
        if bad:
            raise InvalidArgument(
                "only labels can be updated",
                reason="INVALID_UPDATE_MASK",
                field_violations=[
                    FieldViolation("update_mask", f"{p} is not updatable") for p in bad
                ],
            )
        check_labels(node.labels, "node.labels")

        async def apply(old: pb.Node | None) -> pb.Node:
            if old is None:
                raise NotFound(
                    f"{node.name} does not exist", resource_type="Node", resource_name=node.name
                )
            if node.etag and node.etag != old.etag:
                raise Aborted(
                    f"{node.name} changed since etag {node.etag}",
                    reason="ETAG_MISMATCH",
                    metadata={"etag": old.etag},
                )
            for p in paths:
                if p == "labels":
                    old.labels.clear()
                    old.labels.update(node.labels)
                else:
                    key = p.split(".", 1)[1]
                    if key in node.labels:
                        old.labels[key] = node.labels[key]
                    else:
                        old.labels.pop(key, None)
            old.etag = _etag()
            old.update_time.CopyFrom(convert.ts(time.time()))
            return old

        stored = await self.store.replace("nodes", nid, apply, pb.Node)
        assert isinstance(stored, pb.Node)
        return await self.decorate(stored)

    async def delete_node(self, name: str, etag: str) -> None:
        """Delete a node, its data and its identity."""
        nid = id_of(name, "nodes")

        async def drop(old: pb.Node | None) -> None:
            if old is None:
                raise NotFound(f"{name} does not exist", resource_type="Node", resource_name=name)
            if etag and etag != old.etag:
                raise Aborted(f"{name} changed since etag {etag}", reason="ETAG_MISMATCH")
            return None

        await self.store.replace("nodes", nid, drop, pb.Node)
        await self.store.drop_node_data(nid)
        if self.identities is not None:
            await self.identities.delete(nid)

    # -- sessions: identity check ------------------------------------------------------------

    async def open_session(
        self, principal: Principal | None, hello: pb.AgentHello
    ) -> tuple[pb.Node, pb.Welcome]:
        """Check that the caller is the node's identity; the Welcome for its agent."""
        if not hello.epoch:
            raise InvalidArgument(
                "hello.epoch is required",
                field_violations=[FieldViolation("hello.epoch", "required")],
            )
        node = await self.node_record(hello.node, "hello.node")
        if principal is None or principal.subject != node.identity:
            raise PermissionDenied(
                f"{hello.node} may only be served to its own identity", reason="NOT_NODE_IDENTITY"
            )
        nid = node.name.split("/", 1)[1]
        async with self.store.redis.pipeline(transaction=False) as pipe:
            self.store.write_status(
                pipe,
                nid,
                {
                    "agent_version": hello.agent_version,
                    "agent_root": "1" if hello.root else "",
                    "dropped": str(hello.dropped),
                },
            )
            pipe.hset(self.store.k("seen"), nid, repr(time.time()))
            await pipe.execute()
        welcome = pb.Welcome(
            applied_sequence=await self.store.applied(nid, hello.epoch),
            labels=dict(node.labels),
            baselines=await self.baselines_for(dict(node.labels)),
        )
        welcome.heartbeat_interval.FromNanoseconds(int(self.settings.heartbeat_interval * 1e9))
        return node, welcome

    # -- ingest (exactly once per node, epoch and sequence) ---------------------------------------

    async def ingest_evaluation(
        self, node_id: str, epoch: str, seq: int, report: pb.EvaluationReport
    ) -> tuple[bool, pb.Evaluation]:
        """Record an agent's evaluation once; (applied now, the evaluation)."""
        results = [convert.result_from_pb(r) for r in report.results]
        previous = await self.store.latest_evaluation(node_id)
        prev_results = [convert.result_from_pb(r) for r in previous.results] if previous else []
        now = time.time()
        when = convert.seconds(report.evaluate_time) if report.HasField("evaluate_time") else now
        c = compliance.counts(results)
        drift = compliance.drift(prev_results, results)
        evaluation = pb.Evaluation(
            name=f"nodes/{node_id}/evaluations/{_evaluation_id(when, seq)}",
            results=report.results,
            score=compliance.score(results),
            passed=c["pass"],
            failed=c["fail"],
            errored=c["error"],
            skipped=c["skip"],
            drift=[
                pb.Drift(
                    baseline=d.baseline,
                    control_id=d.control_id,
                    previous_status=convert.status_pb(d.previous_status),
                    status=convert.status_pb(d.status),
                    previous_observed=d.previous_observed,
                    observed=d.observed,
                )
                for d in drift
            ],
            on_demand=bool(report.command_id),
        )
        evaluation.evaluate_time.CopyFrom(convert.ts(when))
        await self._cite_failures(evaluation.results)

        def writes(pipe: Any) -> None:
            self.store.write_evaluation(pipe, node_id, evaluation)
            self.store.write_status(
                pipe, node_id, {"score": repr(evaluation.score), "evaluation": evaluation.name}
            )

        applied = await self.store.apply_once(node_id, epoch, seq, writes)
        if not applied:
            return False, evaluation
        await self._evaluation_effects(node_id, epoch, seq, evaluation, previous, results)
        return True, evaluation

    async def _cite_failures(self, results: Sequence[pb.ControlResult]) -> None:
        """Attach memory-hub documents about each failed control (its id, title and
        CIS tags) to its result; the seed's "memory-hub context" step. Best effort:
        MemoryContext answers [] when memory-hub is down or the namespace missing."""
        failed = [r for r in results if r.status == pb.RESULT_STATUS_FAIL]
        if self.context is None or not failed:
            return
        tags: dict[tuple[str, str], Sequence[str]] = {}
        for name in {r.baseline for r in failed}:
            bid = name.split("/", 1)[-1]
            b: pb.Baseline | None = await self.store.get("baselines", bid, pb.Baseline)
            for c in b.controls if b is not None else ():
                tags[(name, c.id)] = list(c.tags)
        namespace = self.settings.context_namespace
        found = await asyncio.gather(
            *(
                self.context.search(
                    namespace,
                    " ".join([r.control_id, r.title, *tags.get((r.baseline, r.control_id), ())]),
                )
                for r in failed
            )
        )
        for r, citations in zip(failed, found, strict=True):
            r.context.extend(citations)

    async def _evaluation_effects(
        self,
        node_id: str,
        epoch: str,
        seq: int,
        evaluation: pb.Evaluation,
        previous: pb.Evaluation | None,
        results: list[Any],
    ) -> None:
        node_name = f"nodes/{node_id}"
        key = f"{node_id}:{epoch}:{seq}"
        if self.publisher is not None:
            by_baseline: dict[str, list[pb.ControlResult]] = {}
            for r in evaluation.results:
                if r.status == pb.RESULT_STATUS_FAIL:
                    by_baseline.setdefault(r.baseline, []).append(r)
            for baseline, failed in sorted(by_baseline.items()):
                worst = compliance.max_severity(
                    x for x in results if x.baseline == baseline and x.status == FAIL
                )
                await self.publisher.publish(
                    ev.BaselineViolated(
                        node=node_name,
                        baseline=baseline,
                        baseline_version=failed[0].baseline_version,
                        evaluation=evaluation.name,
                        failed=failed,
                        max_severity=convert.severity_pb(worst),
                        evaluate_time=evaluation.evaluate_time,
                    ),
                    subject=node_name,
                    key=f"violated:{key}:{baseline}",
                )
            if evaluation.drift:
                await self.publisher.publish(
                    ev.NodeDriftDetected(
                        node=node_name,
                        evaluation=evaluation.name,
                        drift=evaluation.drift,
                        previous_score=previous.score if previous else 0.0,
                        score=evaluation.score,
                        detect_time=convert.ts(time.time()),
                    ),
                    subject=node_name,
                    key=f"drift:{key}",
                )
        if self.audit is not None:
            await self.audit.record(
                type="machineops.evaluation",
                action="machineops.evaluations.record",
                resource=evaluation.name,
                details={
                    "score": evaluation.score,
                    "passed": evaluation.passed,
                    "failed": evaluation.failed,
                    "errored": evaluation.errored,
                    "skipped": evaluation.skipped,
                    "drifted": len(evaluation.drift),
                },
            )

    async def ingest_inventory(
        self, node_id: str, epoch: str, seq: int, delta: pb.InventoryDelta
    ) -> bool:
        """Record an inventory delta once, with its change history."""
        old, _ = await self.store.inventory(node_id)
        changed = convert.tables_from_pb(delta.tables)
        removed = list(delta.removed_tables)
        now = time.time()
        history = [
            {
                "table": c.table,
                "added": list(c.added),
                "removed": list(c.removed),
                "changed": list(c.changed),
                "time": now,
            }
            for c in inventory.changes(old, changed, removed)
        ]
        when = convert.seconds(delta.collect_time) if delta.HasField("collect_time") else now
        status = {}
        if changed.get("os_version"):
            row = changed["os_version"][0]
            status["os_version"] = f"{row.get('name', '')} {row.get('version', '')}".strip()
        if changed.get("kernel_info"):
            status["kernel_version"] = changed["kernel_info"][0].get("version", "")

        def writes(pipe: Any) -> None:
            self.store.write_inventory(pipe, node_id, changed, removed, when, history)
            if status:
                self.store.write_status(pipe, node_id, status)

        return await self.store.apply_once(node_id, epoch, seq, writes)

    async def ingest_plain(self, node_id: str, epoch: str, seq: int) -> bool:
        """Mark a message with no stored effect (a command result) as applied."""
        return await self.store.apply_once(node_id, epoch, seq, lambda pipe: None)

    # -- reading results ------------------------------------------------------------------

    async def list_evaluations(
        self, parent: str, page_size: int, token: str
    ) -> tuple[list[pb.Evaluation], str]:
        """One page of a node's evaluations, newest first."""
        node = await self.node_record(parent, "parent")
        items = await self.store.evaluations(node.name.split("/", 1)[1])
        return page_by_key(items, page_size, token, lambda e: e.name.rsplit("/", 1)[1], default=20)

    async def group_compliance(self, selector: str) -> pb.GetGroupComplianceResponse:
        """Per-node and mean scores of the nodes a selector matches."""
        sel = parse_selector(selector)
        nodes = sorted(
            (n for n in await self.store.all("nodes", pb.Node) if matches(sel, dict(n.labels))),
            key=lambda n: n.name,
        )
        out = pb.GetGroupComplianceResponse(nodes=len(nodes))
        statuses = await self.store.statuses([n.name.split("/", 1)[1] for n in nodes])
        scores = []
        for n in nodes:
            item = pb.NodeCompliance(node=n.name)
            st = statuses[n.name.split("/", 1)[1]]
            if "score" in st:
                item.score = float(st["score"])
                scores.append(item.score)
                latest = await self.store.latest_evaluation(n.name.split("/", 1)[1])
                item.failed = latest.failed if latest else 0
            out.node_compliance.append(item)
        out.evaluated_nodes = len(scores)
        if scores:
            out.score = round(sum(scores) / len(scores), 2)
        return out

    async def policy_report(self, name: str) -> dict[str, Any]:
        """The PolicyReport of a node's latest evaluation."""
        node = await self.node_record(name)
        latest = await self.store.latest_evaluation(node.name.split("/", 1)[1])
        if latest is None:
            raise FailedPrecondition(f"{name} has not been evaluated yet", reason="NOT_EVALUATED")
        return compliance.policy_report(
            node.name,
            [convert.result_from_pb(r) for r in latest.results],
            convert.seconds(latest.evaluate_time),
        )

    async def inventory_of(self, name: str, tables: Sequence[str]) -> pb.Inventory:
        """A node's inventory (``nodes/{node}/inventory``), optionally some tables."""
        if not name.endswith("/inventory"):
            raise InvalidArgument(
                "name must be nodes/{node}/inventory",
                field_violations=[FieldViolation("name", "must be nodes/{node}/inventory")],
            )
        node = await self.node_record(name.removesuffix("/inventory"))
        data, when = await self.store.inventory(node.name.split("/", 1)[1])
        if tables:
            data = {t: r for t, r in data.items() if t in set(tables)}
        out = pb.Inventory(name=name, tables=convert.tables_to_pb(data))
        if when:
            out.collect_time.CopyFrom(convert.ts(when))
        return out

    async def inventory_changes(
        self, parent: str, page_size: int, token: str
    ) -> tuple[list[pb.InventoryChange], str]:
        """One page of a node's inventory changes, newest first."""
        node = await self.node_record(parent, "parent")
        raw = await self.store.inventory_changes(node.name.split("/", 1)[1])
        indexed = [(f"{i:08d}", c) for i, c in enumerate(raw)]
        page, nxt = page_by_key(indexed, page_size, token, lambda x: x[0], default=50)
        out = []
        for _, c in page:
            item = pb.InventoryChange(
                table=c["table"], added=c["added"], removed=c["removed"], changed=c["changed"]
            )
            item.change_time.CopyFrom(convert.ts(c["time"]))
            out.append(item)
        return out, nxt


def _selects(selector: str, labels: dict[str, str]) -> bool:
    try:
        return matches(parse_selector(selector), labels)
    except InvalidArgument:
        return False


def pack(msg: message.Message) -> bytes:
    """A message's bytes (for replays and routing)."""
    return msg.SerializeToString()
