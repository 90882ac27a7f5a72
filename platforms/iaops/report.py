"""Validation reports as JSON, SARIF 2.1.0, JUnit XML and a terminal table.

SARIF follows the OASIS 2.1.0 standard (errata 01): one run, the rules that
fired in ``tool.driver.rules`` with their help and a ``security-severity``
(GitHub code scanning ranks alerts by it), each result located by a
relative ``artifactLocation.uri`` and a 1-based ``region.startLine``, and
the Kubernetes/Terraform object as a logical location.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree as ET

from autoecoops.common.v1.types_pb2 import Severity
from autoecoops.platforms.iaops.rules import RULES
from autoecoops.platforms.iaops.validation import Finding, Report

TOOL = "autoecoops-iaops"
TOOL_URI = "https://github.com/autoecoops/autoecoops/blob/main/docs/iaops.md"
SARIF_SCHEMA = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)

SEVERITY_NAMES: Mapping[int, str] = {
    Severity.SEVERITY_UNSPECIFIED: "UNSPECIFIED",
    Severity.SEVERITY_INFO: "INFO",
    Severity.SEVERITY_LOW: "LOW",
    Severity.SEVERITY_MEDIUM: "MEDIUM",
    Severity.SEVERITY_HIGH: "HIGH",
    Severity.SEVERITY_CRITICAL: "CRITICAL",
}
#: GitHub's security-severity scale (CVSS-like bands).
SECURITY_SEVERITY: Mapping[int, str] = {
    Severity.SEVERITY_INFO: "0.0",
    Severity.SEVERITY_LOW: "2.0",
    Severity.SEVERITY_MEDIUM: "5.5",
    Severity.SEVERITY_HIGH: "8.0",
    Severity.SEVERITY_CRITICAL: "9.5",
}


def _level(f: Finding) -> str:
    if f.failure:
        return "error"
    return "note" if f.severity <= Severity.SEVERITY_INFO else "warning"


def finding_dict(f: Finding) -> dict[str, Any]:
    """One finding as JSON."""
    return {
        "rule_id": f.rule_id,
        "rule_name": f.rule_name,
        "severity": SEVERITY_NAMES.get(f.severity, "UNSPECIFIED"),
        "failure": f.failure,
        "file": f.file,
        "line": f.line,
        "resource": {
            "api_version": f.resource.api_version,
            "kind": f.resource.kind,
            "namespace": f.resource.namespace,
            "name": f.resource.name,
        },
        "message": f.message,
        "remediation": f.remediation,
        "json_pointer": f.pointer,
        "source": f.source,
        "help_uri": f.help_uri,
    }


def to_json(report: Report) -> str:
    """The report as JSON."""
    doc = {
        "passed": report.passed,
        "resource_count": report.resource_count,
        "file_count": report.file_count,
        "failure_count": report.failures,
        "warning_count": report.warnings,
        "policy_bundle": report.policy_bundle,
        "revision": report.revision,
        "findings": [finding_dict(f) for f in report.findings],
    }
    return json.dumps(doc, indent=2)


def _uri(path: str) -> str:
    posix = PurePath(path).as_posix()
    return quote(posix.lstrip("/") if not PurePath(path).is_absolute() else posix, safe="/:@")


def _sarif_rule(f: Finding) -> dict[str, Any]:
    rule = RULES.get(f.rule_id)
    title = rule.title if rule else f.rule_name
    out: dict[str, Any] = {
        "id": f.rule_id,
        "name": _pascal(f.rule_name),
        "shortDescription": {"text": title},
        "fullDescription": {"text": title},
        "help": {"text": f.remediation or title},
        "defaultConfiguration": {"level": _level(f)},
        "properties": {
            "security-severity": SECURITY_SEVERITY.get(f.severity, "0.0"),
            "tags": ["security", "iac", f.source],
        },
    }
    if f.help_uri:
        out["helpUri"] = f.help_uri
    return out


def _pascal(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.replace("_", "-").split("-") if p) or "Rule"


def to_sarif(report: Report, *, tool_version: str = "0.1.0") -> str:
    """The report as a SARIF 2.1.0 log."""
    rules: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    results: list[dict[str, Any]] = []
    for f in report.findings:
        if f.rule_id not in index:
            index[f.rule_id] = len(rules)
            rules.append(_sarif_rule(f))
        location: dict[str, Any] = {"artifactLocation": {"uri": _uri(f.file)}}
        if f.line > 0:
            location["region"] = {"startLine": f.line}
        result: dict[str, Any] = {
            "ruleId": f.rule_id,
            "ruleIndex": index[f.rule_id],
            "level": _level(f),
            "message": {"text": f.message + (f" Fix: {f.remediation}" if f.remediation else "")},
            "locations": [{"physicalLocation": location}],
            "partialFingerprints": {
                "autoecoops/v1": f"{f.rule_id}:{f.resource}:{f.pointer}",
            },
            "properties": {"severity": SEVERITY_NAMES.get(f.severity, "UNSPECIFIED")},
        }
        if str(f.resource):
            result["locations"][0]["logicalLocations"] = [
                {"fullyQualifiedName": str(f.resource), "kind": "resource"}
            ]
        results.append(result)
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL,
                        "informationUri": TOOL_URI,
                        "version": tool_version,
                        "rules": rules,
                    }
                },
                "results": results,
                "columnKind": "unicodeCodePoints",
            }
        ],
    }
    return json.dumps(log, indent=2)


def to_junit(report: Report) -> str:
    """The report as JUnit XML: a suite per file, a case per finding (failures fail)."""
    root = ET.Element(
        "testsuites",
        name=TOOL,
        tests=str(max(len(report.findings), 1)),
        failures=str(report.failures),
        errors="0",
    )
    by_file: dict[str, list[Finding]] = {}
    for f in report.findings:
        by_file.setdefault(f.file, []).append(f)
    if not by_file:
        suite = ET.SubElement(root, "testsuite", name=TOOL, tests="1", failures="0", errors="0")
        ET.SubElement(suite, "testcase", classname=TOOL, name="no findings")
    for file, findings in sorted(by_file.items()):
        failures = sum(1 for f in findings if f.failure)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=file,
            tests=str(len(findings)),
            failures=str(failures),
            errors="0",
            skipped="0",
        )
        for f in findings:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=str(f.resource) or file,
                name=f"{f.rule_id} {f.rule_name}",
                file=file,
                line=str(f.line),
            )
            text = f"{file}:{f.line}: {f.message}\nremediation: {f.remediation}"
            if f.failure:
                failure = ET.SubElement(
                    case, "failure", message=f.message, type=SEVERITY_NAMES.get(f.severity, "")
                )
                failure.text = text
            else:
                out = ET.SubElement(case, "system-out")
                out.text = f"WARNING {text}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def to_table(report: Report) -> str:
    """A table for a terminal, then Conftest's summary line."""
    rows = [("SEVERITY", "RULE", "RESOURCE", "LOCATION", "MESSAGE")]
    for f in report.findings:
        rows.append(
            (
                SEVERITY_NAMES.get(f.severity, "") + ("" if f.failure else " (warn)"),
                f.rule_id,
                str(f.resource) or "-",
                f"{f.file}:{f.line}",
                f.message,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]
    if len(rows) == 1:
        lines = []
    lines.append(
        f"{report.resource_count} resources in {report.file_count} files: "
        f"{report.failures} failures, {report.warnings} warnings"
    )
    return "\n".join(lines)


FORMATS = {"json": to_json, "sarif": to_sarif, "junit": to_junit, "table": to_table}
