"""IAOps's wiring: settings, store, kernel peers, the OSV database and the flows.

The use cases live here as plain async methods (validate files or an
application, scan an SBOM, verify and gate an artifact); service.py only
translates proto <-> these calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoecoops.common.v1.types_pb2 import Severity
from autoecoops.iaops.v1 import events_pb2 as ev
from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.kernel.mesh.audit import FAILURE, SUCCESS, trail_for
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
)
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.platforms.iaops import convert, osv, sbom, signing
from autoecoops.platforms.iaops.deployments import DeploymentFlow
from autoecoops.platforms.iaops.documents import Document, DocumentError, parse
from autoecoops.platforms.iaops.peers import (
    Decision,
    EventPeer,
    InfraPeer,
    PolicyPeer,
    acting_for,
)
from autoecoops.platforms.iaops.settings import IaOpsSettings
from autoecoops.platforms.iaops.store import IaOpsStore
from autoecoops.platforms.iaops.validation import (
    PARSE_ERROR_RULE,
    Finding,
    Report,
    Validator,
    rego_findings,
)

log = logging.getLogger("autoecoops.iaops")
SERVICE = "iaops"
DEFAULT_PACKAGES = ("main",)


@dataclass
class OsvSource:
    """The OSV database, reloaded when its directory or zip changes."""

    path: os.PathLike[str]
    db: osv.OsvDatabase = field(default_factory=osv.OsvDatabase)
    _stamp: tuple[float, int] = (0.0, -1)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _current_stamp(self) -> tuple[float, int]:
        from pathlib import Path

        p = Path(self.path)
        if not p.exists():
            return (0.0, 0)
        if p.is_file():
            st = p.stat()
            return (st.st_mtime, st.st_size)
        files = list(p.rglob("*.json"))
        return (max((f.stat().st_mtime for f in files), default=p.stat().st_mtime), len(files))

    async def get(self) -> osv.OsvDatabase:
        """The database, loaded (off the event loop) when it changed."""
        stamp = await asyncio.to_thread(self._current_stamp)
        if stamp == self._stamp:
            return self.db
        async with self._lock:
            if stamp != self._stamp:
                from pathlib import Path

                self.db = await asyncio.to_thread(osv.load, Path(self.path))
                self._stamp = stamp
                log.info("OSV: %d records from %s", len(self.db), self.path)
        return self.db


class IaOpsApp:
    """The platform's use cases over the kernel."""

    def __init__(self, runtime: Runtime, settings: IaOpsSettings | None = None) -> None:
        self.runtime = runtime
        self.settings = settings or IaOpsSettings.from_env(runtime.config)
        clients = runtime.clients
        self.policy = PolicyPeer(clients)
        self.infra = InfraPeer(clients)
        self.events = EventPeer(clients, self.settings.event_timeout)
        self.audit = trail_for(runtime, SERVICE)
        self.osv = OsvSource(self.settings.osv_path)
        self._store: IaOpsStore | None = None
        self._flow: DeploymentFlow | None = None

    @property
    def store(self) -> IaOpsStore:
        """The Redis store (connects on first use)."""
        if self._store is None:
            self._store = IaOpsStore(
                self.runtime.redis, self.runtime.key(SERVICE), self.settings.request_id_ttl
            )
        return self._store

    @property
    def flow(self) -> DeploymentFlow:
        """The deployment flow."""
        if self._flow is None:
            self._flow = DeploymentFlow(
                store=self.store,
                infra=self.infra,
                events=self.events,
                audit=self.audit,
                validate=self._validate_for_deploy,
                decide=self._decide_deploy,
                report_pb=convert.report_pb,
                settings=self.settings,
            )
        return self._flow

    # -- validation ----------------------------------------------------------------

    async def _rego(
        self, docs: Sequence[Document], bundle: str, packages: Sequence[str], report: Report
    ) -> None:
        if not bundle:
            return
        spec = await self.policy.bundle(bundle)
        packages = list(packages) or list(DEFAULT_PACKAGES)
        roots = [r.strip("/") for r in spec.roots]
        outside = [
            p
            for p in packages
            if roots and not any((p.replace(".", "/") + "/").startswith(r + "/") for r in roots)
        ]
        if outside:
            raise FailedPrecondition(
                f"packages {', '.join(outside)} are outside bundle {bundle}'s roots ({', '.join(roots)})",
                reason="PACKAGE_OUTSIDE_BUNDLE",
                field_violations=[
                    FieldViolation("policy_packages", f"{p} is not in the bundle") for p in outside
                ],
            )

        async def evaluate(package: str, input: Mapping[str, Any]) -> Any:
            result, _ = await self.policy.evaluate(package.replace(".", "/"), input)
            return result

        report.findings.extend(
            await rego_findings(
                docs, packages, evaluate, concurrency=self.settings.rego_concurrency
            )
        )
        report.policy_bundle = bundle

    async def validate_files(
        self,
        files: Iterable[tuple[str, str]],
        *,
        bundle: str = "",
        packages: Sequence[str] = (),
        skip: Sequence[str] = (),
    ) -> Report:
        """Built-in rules, then the bundle's Conftest-style rules, over files."""
        validator = _validator(skip)
        report = Report()
        docs = validator.load(files, report)
        validator.check(docs, report)
        await self._rego(docs, bundle, packages, report)
        report.sort()
        return report

    async def validate_application(
        self,
        application: str,
        revision: str = "",
        *,
        bundle: str = "",
        packages: Sequence[str] = (),
        skip: Sequence[str] = (),
    ) -> Report:
        """The application's manifests, rendered by infra-manager at ``revision``."""
        rendered = await self.infra.manifests(application, revision)
        validator = _validator(skip)
        report = Report(revision=rendered.revision)
        docs: list[Document] = []
        files: set[str] = set()
        for m in rendered.manifests:
            files.add(m.source_path)
            try:
                parsed = parse(m.yaml, m.source_path, line_offset=max(m.line, 1) - 1)
            except DocumentError as err:
                report.findings.append(
                    Finding(
                        PARSE_ERROR_RULE,
                        "parse-error",
                        Severity.SEVERITY_HIGH,
                        err.file,
                        err.line,
                        err.message,
                    )
                )
                continue
            for doc in parsed:
                doc.index = m.document_index
                docs.append(doc)
        report.file_count = len(files)
        validator.check(docs, report)
        await self._rego(docs, bundle, packages, report)
        report.sort()
        return report

    async def _validate_for_deploy(self, application: str, revision: str, bundle: str) -> Report:
        return await self.validate_application(application, revision, bundle=bundle)

    async def _decide_deploy(self, input: Mapping[str, Any], caller: Principal | None) -> Decision:
        return await self.policy.decide(self.settings.deploy_policy, input, acting_for.get())

    async def act_for(self, caller: Principal | None) -> None:
        """Make this request's calls to the kernel on ``caller``'s behalf."""
        acting_for.set(tuple(await self._as_caller(caller)))

    async def _as_caller(self, caller: Principal | None) -> list[tuple[str, str]]:
        """Metadata that makes a call on the caller's behalf (RFC 8693 token exchange),
        so policy-audit decides about the user, with IAOps named in ``act``."""
        source = self.runtime.clients.token_source
        exchange = getattr(source, "on_behalf_of", None)
        if caller is None or not caller.token or exchange is None:
            return []
        audience = caller.claims.get("aud", "autoecoops")
        if isinstance(audience, list):
            audience = audience[0] if audience else "autoecoops"
        try:
            return list(await exchange(caller, str(audience)))
        except Exception as err:  # grpc errors of the exchange: the decision cannot be made
            raise FailedPrecondition(
                f"could not act on the caller's behalf towards policy-audit: {err}",
                reason="DELEGATION_FAILED",
            ) from None

    # -- supply chain ----------------------------------------------------------------

    async def scan(self, document: bytes, fmt: int = 0) -> pb.ScanSbomResponse:
        """Match an SBOM's components against the OSV database."""
        if not document:
            raise InvalidArgument(
                "document is required",
                reason="SBOM_REQUIRED",
                field_violations=[FieldViolation("document", "required")],
            )
        found, components = await asyncio.to_thread(sbom.read, document, fmt)
        db = await self.osv.get()
        matches = await asyncio.to_thread(db.match, components)
        return convert.scan_pb(found, components, matches, len(db))

    async def verify(
        self, request: pb.VerifyArtifactRequest, caller: Principal | None
    ) -> pb.VerifyArtifactResponse:
        """Verify signatures and provenance, scan the SBOM, gate by policy, audit, publish."""
        if request.request_id:
            kept = await self.store.verification(request.request_id)
            if kept is not None:
                return kept
        pol = request.provenance_policy
        result = signing.verify(
            artifact_ref=request.artifact_ref,
            digest=request.digest,
            public_key=request.public_key,
            signatures=[(s.payload, s.signature) for s in request.signatures],
            attestations=list(request.attestations),
            policy=signing.ProvenancePolicy(
                tuple(pol.allowed_builder_ids), pol.source_repository, tuple(pol.allowed_refs)
            ),
            keyless=request.keyless,
        )
        reply = pb.VerifyArtifactResponse(verified=result.verified, digest=result.digest)
        if result.signed:
            reply.signer.CopyFrom(pb.Signer(key_id=result.key_id, algorithm=result.algorithm))
        reply.checks.extend(
            pb.VerificationCheck(name=c.name, passed=c.passed, message=c.message)
            for c in result.checks
        )
        if request.sbom:
            reply.sbom_scan.CopyFrom(await self.scan(request.sbom))
        gate_input = convert.gate_input(request, result, reply)
        decision = await self.policy.decide(self.settings.artifact_policy, gate_input)
        reply.gate.CopyFrom(
            pb.GateDecision(
                allowed=decision.allow,
                reasons=list(decision.reasons),
                decision_id=decision.decision_id,
            )
        )
        await self.audit.record(
            type="iaops.artifact.verified",
            action="artifacts.verify",
            resource=f"iaops/artifacts/{request.artifact_ref}",
            outcome=SUCCESS if decision.allow and result.verified else FAILURE,
            decision_id=decision.decision_id,
            details={
                "digest": result.digest,
                "verified": result.verified,
                "failed_checks": result.failed,
                "allowed": decision.allow,
                "reasons": list(decision.reasons),
                "vulnerabilities": len(reply.sbom_scan.vulnerabilities),
                "key_id": result.key_id,
            },
            actor=caller,
        )
        event = ev.ArtifactVerified(
            artifact_ref=request.artifact_ref,
            digest=result.digest,
            verified=result.verified,
            failed_checks=result.failed,
            allowed=decision.allow,
            decision_id=decision.decision_id,
            vulnerability_count=len(reply.sbom_scan.vulnerabilities),
        )
        if reply.HasField("signer"):
            event.signer.CopyFrom(reply.signer)
        event.verify_time.GetCurrentTime()
        await self.events.publish(
            event,
            subject=request.artifact_ref,
            resource=f"iaops/artifacts/{request.artifact_ref}",
            key=f"artifact/{result.digest}/{decision.decision_id}",
        )
        if request.request_id:
            await self.store.save_verification(request.request_id, reply)
        return reply


def _validator(skip: Sequence[str]) -> Validator:
    try:
        return Validator(skip)
    except KeyError as err:
        raise InvalidArgument(
            f"unknown rules to skip: {err.args[0]}",
            reason="UNKNOWN_RULE",
            field_violations=[
                FieldViolation("skip_rules", f"unknown rule {s}")
                for s in str(err.args[0]).split(", ")
            ],
        ) from None


__all__ = ["AutoEcoOpsError", "IaOpsApp"]
