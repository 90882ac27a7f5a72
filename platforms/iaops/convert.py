"""Domain objects <-> IAOps protos."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.platforms.iaops.osv import Match
from autoecoops.platforms.iaops.report import SEVERITY_NAMES
from autoecoops.platforms.iaops.sbom import Component
from autoecoops.platforms.iaops.signing import Verification
from autoecoops.platforms.iaops.validation import Finding, Report


def finding_pb(f: Finding) -> pb.Finding:
    """A finding as proto."""
    return pb.Finding(
        rule_id=f.rule_id,
        rule_name=f.rule_name,
        severity=f.severity,
        resource=pb.ResourceRef(
            api_version=f.resource.api_version,
            kind=f.resource.kind,
            namespace=f.resource.namespace,
            name=f.resource.name,
        ),
        file=f.file,
        line=f.line,
        message=f.message,
        remediation=f.remediation,
        json_pointer=f.pointer,
        source=f.source,
        help_uri=f.help_uri,
    )


def report_pb(report: Report) -> pb.ValidationReport:
    """A report as proto."""
    return pb.ValidationReport(
        passed=report.passed,
        resource_count=report.resource_count,
        file_count=report.file_count,
        findings=[finding_pb(f) for f in report.findings],
        failure_count=report.failures,
        warning_count=report.warnings,
        policy_bundle=report.policy_bundle,
        revision=report.revision,
    )


def scan_pb(
    fmt: int, components: Sequence[Component], matches: Sequence[Match], records: int
) -> pb.ScanSbomResponse:
    """An SBOM scan as proto."""
    return pb.ScanSbomResponse(
        format=fmt,  # type: ignore[arg-type]
        component_count=len(components),
        matched_component_count=sum(1 for c in components if c.parsed is not None),
        vulnerabilities=[
            pb.Vulnerability(
                id=m.record.id,
                aliases=list(m.record.aliases),
                purl=m.component.purl,
                ecosystem=m.ecosystem,
                package=m.package,
                version=m.component.parsed.version or m.component.version
                if m.component.parsed
                else m.component.version,
                severity=m.severity,
                fixed_versions=list(m.fixed),
                summary=m.record.summary,
            )
            for m in matches
        ],
        osv_record_count=records,
    )


def gate_input(
    request: pb.VerifyArtifactRequest, result: Verification, reply: pb.VerifyArtifactResponse
) -> dict[str, Any]:
    """The supply-chain gate's policy input."""
    from autoecoops.platforms.iaops.signing import repository_of

    ref = request.artifact_ref
    repo = repository_of(ref)
    registry = repo.split("/", 1)[0] if "/" in repo else "docker.io"
    vulns = [
        {
            "id": v.id,
            "purl": v.purl,
            "severity": SEVERITY_NAMES.get(v.severity, "UNSPECIFIED"),
            "fixed_versions": list(v.fixed_versions),
        }
        for v in reply.sbom_scan.vulnerabilities
    ]
    return {
        "artifact": {"ref": ref, "repository": repo, "registry": registry, "digest": result.digest},
        "verification": {
            "verified": result.verified,
            "signed": result.signed,
            "key_id": result.key_id,
            "failed_checks": result.failed,
            "provenance": result.provenance,
        },
        "scan": {"present": bool(request.sbom), "vulnerabilities": vulns},
    }
