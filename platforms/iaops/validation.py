"""Validation: documents in, findings with file and line out.

The built-in rules run in-process; user rules are Conftest-style Rego
(``deny``/``warn``/``violation`` rules, optionally suffixed ``_name``, in the
configured packages) evaluated by policy-audit through a ``RegoEvaluator``,
with Conftest's input shape: each YAML document is the input on its own, a
Terraform plan is the whole plan.

A finding fails validation when its severity is MEDIUM or above (and every
Rego ``deny``/``violation``); LOW and INFO findings (and Rego ``warn``)
are warnings. That is Conftest's failure/warning split, so the CLI can use
Conftest's exit codes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from autoecoops.common.v1.types_pb2 import Severity
from autoecoops.platforms.iaops.documents import Document, DocumentError, parse
from autoecoops.platforms.iaops.rules import (
    RULES,
    Hit,
    as_map,
    check_network_policies,
    check_plan,
    check_pod,
    is_plan,
)

#: Findings at or above this severity fail validation.
FAIL_AT = Severity.SEVERITY_MEDIUM
#: Conftest's rule names: deny, warn or violation, optionally with a _suffix.
CONFTEST_RULE = re.compile(r"^(deny|violation|warn)(_[a-zA-Z0-9_]+)*$")
PARSE_ERROR_RULE = "AEO-PARSE-001"


@dataclass(frozen=True, slots=True)
class ResourceId:
    """The object a finding is on."""

    api_version: str = ""
    kind: str = ""
    namespace: str = ""
    name: str = ""

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{ns}{self.name}" if self.kind else self.name


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule broken at one place."""

    rule_id: str
    rule_name: str
    severity: Severity.ValueType
    file: str
    line: int
    message: str
    remediation: str = ""
    pointer: str = ""
    resource: ResourceId = field(default_factory=ResourceId)
    source: str = "builtin"
    help_uri: str = ""
    #: Only Rego findings: True for warn rules (a warning whatever the severity).
    warn_only: bool = False

    @property
    def failure(self) -> bool:
        """Whether it fails validation (else it is a warning)."""
        return not self.warn_only and self.severity >= FAIL_AT


@dataclass(slots=True)
class Report:
    """The outcome of one validation."""

    findings: list[Finding] = field(default_factory=list)
    resource_count: int = 0
    file_count: int = 0
    policy_bundle: str = ""
    revision: str = ""

    @property
    def failures(self) -> int:
        """How many findings fail."""
        return sum(1 for f in self.findings if f.failure)

    @property
    def warnings(self) -> int:
        """How many findings only warn."""
        return sum(1 for f in self.findings if not f.failure)

    @property
    def passed(self) -> bool:
        """No failing finding."""
        return self.failures == 0

    def sort(self) -> None:
        """Most severe first, then by file and line."""
        self.findings.sort(key=lambda f: (-f.severity, f.file, f.line, f.rule_id, f.message))


class RegoEvaluator(Protocol):
    """Evaluates a Rego package over an input (policy-audit's Evaluate)."""

    async def __call__(self, package: str, input: Mapping[str, Any]) -> Any:
        """The package's document (rule name -> value); None when undefined."""
        ...


def resource_of(doc: Document) -> ResourceId:
    """The resource identity of a Kubernetes document."""
    data = doc.data
    if not isinstance(data, Mapping):
        return ResourceId()
    meta = as_map(data.get("metadata"))
    return ResourceId(
        str(data.get("apiVersion", "")),
        str(data.get("kind", "")),
        str(meta.get("namespace", "") or ""),
        str(meta.get("name", "") or ""),
    )


def _finding(hit: Hit, doc: Document, resource: ResourceId) -> Finding:
    rule = hit.rule
    return Finding(
        rule_id=rule.id,
        rule_name=rule.name,
        severity=rule.severity,
        file=doc.file,
        line=doc.line_of(hit.pointer),
        message=f"{rule.title}: {hit.message}",
        remediation=rule.remediation,
        pointer=hit.pointer,
        resource=resource,
        help_uri=rule.help_uri,
    )


class Validator:
    """Runs the built-in rules over documents, minus the skipped ones."""

    def __init__(self, skip: Iterable[str] = ()) -> None:
        skip = set(skip)
        unknown = {
            s for s in skip if s not in RULES and not any(r.name == s for r in RULES.values())
        }
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        self.skip = {r.id for r in RULES.values() if r.id in skip or r.name in skip}

    def load(self, files: Iterable[tuple[str, str]], report: Report) -> list[Document]:
        """Parse files; a file that does not parse becomes a finding, not an exception."""
        docs: list[Document] = []
        for path, text in files:
            report.file_count += 1
            try:
                docs.extend(parse(text, path))
            except DocumentError as err:
                report.findings.append(
                    Finding(
                        rule_id=PARSE_ERROR_RULE,
                        rule_name="parse-error",
                        severity=Severity.SEVERITY_HIGH,
                        file=err.file,
                        line=err.line,
                        message=f"not valid YAML/JSON: {err.message}",
                        remediation="Fix the syntax; every document must be a YAML mapping.",
                    )
                )
        return docs

    def check(self, docs: Sequence[Document], report: Report) -> None:
        """Run every built-in rule over ``docs``, adding findings to ``report``."""
        k8s: list[Document] = []
        for doc in docs:
            if is_plan(doc.data):
                report.resource_count += self._plan(doc, report)
            elif isinstance(doc.data, Mapping) and "kind" in doc.data:
                k8s.append(doc)
        report.resource_count += len(k8s)
        out = report.findings
        skip = self.skip
        for doc in k8s:
            resource: ResourceId | None = None
            for hit in check_pod(doc.data):
                if hit.rule.id in skip:
                    continue
                resource = resource or resource_of(doc)
                out.append(_finding(hit, doc, resource))
        for i, hit in check_network_policies([d.data for d in k8s]):
            if hit.rule.id not in skip:
                out.append(_finding(hit, k8s[i], resource_of(k8s[i])))

    def _plan(self, doc: Document, report: Report) -> int:
        from autoecoops.platforms.iaops.rules import planned_resources

        for res, hit in check_plan(doc.data):
            if hit.rule.id in self.skip:
                continue
            report.findings.append(
                _finding(hit, doc, ResourceId(res.provider, res.type, "", res.address))
            )
        return sum(1 for _ in planned_resources(doc.data))

    def validate(self, files: Iterable[tuple[str, str]]) -> Report:
        """Parse and check files with the built-in rules."""
        report = Report()
        self.check(self.load(files, report), report)
        report.sort()
        return report


def _messages(value: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """Conftest's rule values: a set/array of strings or of objects with "msg"."""
    items = value if isinstance(value, list) else [value] if value not in (None, False) else []
    out: list[tuple[str, Mapping[str, Any]]] = []
    for item in items:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, Mapping):
            out.append((str(item.get("msg", "")), item))
        elif item is True:
            out.append(("", {}))
    return out


async def rego_findings(
    docs: Sequence[Document],
    packages: Sequence[str],
    evaluate: RegoEvaluator,
    *,
    concurrency: int = 16,
) -> list[Finding]:
    """Conftest-compatible Rego rules over each document (one input per document)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(doc: Document, package: str) -> list[Finding]:
        async with gate:
            result = await evaluate(package, doc.data)
        if not isinstance(result, Mapping):
            return []
        found: list[Finding] = []
        resource = resource_of(doc)
        for rule_name in sorted(result):
            if not CONFTEST_RULE.match(rule_name):
                continue
            warn = rule_name.startswith("warn")
            for msg, details in _messages(result[rule_name]):
                found.append(
                    Finding(
                        rule_id=f"rego:{package}.{rule_name}",
                        rule_name=rule_name,
                        severity=Severity.SEVERITY_LOW if warn else Severity.SEVERITY_HIGH,
                        file=doc.file,
                        line=doc.line,
                        message=msg or f"{package}.{rule_name}",
                        remediation=str(details.get("remediation", "")),
                        resource=resource,
                        source="rego",
                        warn_only=warn,
                    )
                )
        return found

    results = await asyncio.gather(
        *(one(doc, pkg) for doc in docs if doc.data is not None for pkg in packages)
    )
    return [f for batch in results for f in batch]
