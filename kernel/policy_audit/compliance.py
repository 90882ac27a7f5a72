"""Compliance reports: controls evaluated over a time range of the audit trail.

The controls catalogue (YAML) gives each control an id, a title, its
mappings to SOC 2, CIS Controls and NIST SP 800-53 ids, and the evidence
rule that decides it:

- ``query``: the entries of some types (and outcomes) in the range; the
  count is compared with ``min``/``max``.
- ``rego``: a Rego module evaluated over those entries; its ``rule`` returns
  ``{"result": "pass"|"fail"|"warn"|"skip", "message": ..., "evidence": [indexes]}``.

Every evidence entry comes with its exact bytes, leaf hash and an inclusion
proof against one signed checkpoint, so an auditor can check each one
without trusting this service.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from autoecoops.kernel.mesh.errors import ConfigError, FieldViolation, InvalidArgument
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.canonical import entry_json
from autoecoops.kernel.policy_audit.engine import CompiledBundle, CompileError, EvaluationError
from autoecoops.kernel.policy_audit.trail import AuditLog, SignedCheckpoint, StoredEntry

FRAMEWORKS = ("SOC2", "CIS", "NIST-800-53")
RESULTS = ("pass", "fail", "warn", "error", "skip")
#: Entries a report reads from its range before it declines (narrow the range).
MAX_REPORT_ENTRIES = 200_000
OUTCOMES = ("OUTCOME_SUCCESS", "OUTCOME_FAILURE", "OUTCOME_DENIED")
_ADJECTIVE = {
    "OUTCOME_SUCCESS": "successful",
    "OUTCOME_FAILURE": "failed",
    "OUTCOME_DENIED": "denied",
}


@dataclass(frozen=True, slots=True)
class Evidence:
    """How a control is decided."""

    kind: str
    types: tuple[str, ...] = ()
    outcomes: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    #: Result when fewer than ``min`` entries match.
    below: str = "warn"
    #: Result when more than ``max`` entries match.
    above: str = "fail"
    policy: str = ""
    rule: str = ""
    max_evidence: int = 20


@dataclass(frozen=True, slots=True)
class Control:
    """One control of the catalogue."""

    id: str
    title: str
    description: str
    mappings: dict[str, tuple[str, ...]]
    evidence: Evidence


def load_catalogue(path: Path) -> list[Control]:
    """Read and check a controls catalogue; ``ConfigError`` names what is wrong."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the controls catalogue: {err}") from None
    controls = []
    seen: set[str] = set()
    for i, raw in enumerate((doc or {}).get("controls") or ()):
        where = f"{path}: controls[{i}]"
        cid = str(raw.get("id", ""))
        if not cid or cid in seen:
            raise ConfigError(f"{where}: a unique id is required")
        seen.add(cid)
        mappings = {k: tuple(str(x) for x in v) for k, v in (raw.get("mappings") or {}).items()}
        for fw in mappings:
            if fw not in FRAMEWORKS:
                raise ConfigError(
                    f"{where}: unknown framework {fw!r} (use {', '.join(FRAMEWORKS)})"
                )
        ev = raw.get("evidence") or {}
        evidence = Evidence(
            kind=str(ev.get("kind", "")),
            types=tuple(ev.get("types", ())),
            outcomes=tuple(ev.get("outcomes", ())),
            min=ev.get("min"),
            max=ev.get("max"),
            below=str(ev.get("below", "warn")),
            above=str(ev.get("above", "fail")),
            policy=str(ev.get("policy", "")),
            rule=str(ev.get("rule", "")),
            max_evidence=int(ev.get("max_evidence", 20)),
        )
        if evidence.kind not in ("query", "rego"):
            raise ConfigError(f"{where}: evidence.kind must be query or rego")
        if evidence.below not in RESULTS or evidence.above not in RESULTS:
            raise ConfigError(f"{where}: below/above must be one of {', '.join(RESULTS)}")
        for o in evidence.outcomes:
            if o not in OUTCOMES:
                raise ConfigError(f"{where}: unknown outcome {o!r}")
        if evidence.kind == "rego":
            if not evidence.rule:
                raise ConfigError(f"{where}: a rego evidence rule names its `rule` path")
            try:
                CompiledBundle({f"{cid}.rego": evidence.policy}, {})
            except CompileError as err:
                raise ConfigError(f"{where}: the policy does not compile: {err}") from None
        controls.append(
            Control(
                id=cid,
                title=str(raw.get("title", cid)),
                description=str(raw.get("description", "")),
                mappings=mappings,
                evidence=evidence,
            )
        )
    return controls


@dataclass
class ProvenEntry:
    """An evidence entry with its inclusion proof against the report's checkpoint."""

    stored: StoredEntry
    proof: list[bytes]


@dataclass
class ControlResult:
    """The outcome of one control."""

    control: Control
    result: str
    message: str
    evidence: list[ProvenEntry] = field(default_factory=list)
    matched: int = 0


@dataclass
class ComplianceReport:
    """A report over [start, end) of the audit trail."""

    start_us: int
    end_us: int
    generate_ns: int
    frameworks: tuple[str, ...]
    results: list[ControlResult]
    checkpoint: SignedCheckpoint
    verifier_key: str

    def summary(self) -> dict[str, int]:
        """Counts by result, as a PolicyReport summary."""
        counts = dict.fromkeys(RESULTS, 0)
        for r in self.results:
            counts[r.result] += 1
        return counts


def select(
    catalogue: Sequence[Control], frameworks: Sequence[str], control_ids: Sequence[str]
) -> list[Control]:
    """The controls a report covers; InvalidArgument for unknown names."""
    bad = [
        FieldViolation(f"frameworks[{i}]", f"unknown framework; use {', '.join(FRAMEWORKS)}")
        for i, fw in enumerate(frameworks)
        if fw not in FRAMEWORKS
    ]
    known = {c.id for c in catalogue}
    bad += [
        FieldViolation(f"control_ids[{i}]", "no such control in the catalogue")
        for i, cid in enumerate(control_ids)
        if cid not in known
    ]
    if bad:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in bad), field_violations=bad
        )
    out = []
    for c in catalogue:
        if control_ids and c.id not in control_ids:
            continue
        if frameworks and not any(fw in c.mappings for fw in frameworks):
            continue
        out.append(c)
    return out


def _matching(control: Control, entries: Sequence[StoredEntry]) -> list[StoredEntry]:
    ev = control.evidence
    out = []
    for s in entries:
        if ev.types and s.entry.type not in ev.types:
            continue
        if ev.outcomes and audit_outcome(s) not in ev.outcomes:
            continue
        out.append(s)
    return out


def audit_outcome(s: StoredEntry) -> str:
    """The entry's outcome enum name."""
    from autoecoops.audit.v1 import audit_pb2

    return audit_pb2.Outcome.Name(s.entry.outcome)


def _decide_query(control: Control, matched: list[StoredEntry]) -> tuple[str, str, list[int]]:
    ev = control.evidence
    n = len(matched)
    what = " ".join(
        part
        for part in (
            ", ".join(_ADJECTIVE[o] for o in ev.outcomes),
            ", ".join(ev.types) or "audit",
        )
        if part
    )
    indexes = [s.entry.index for s in matched]
    if ev.min is not None and n < ev.min:
        return ev.below, f"{n} {what} entries in the period; at least {ev.min} expected", indexes
    if ev.max is not None and n > ev.max:
        return ev.above, f"{n} {what} entries in the period; at most {ev.max} allowed", indexes
    return "pass", f"{n} {what} entries in the period", indexes


def _decide_rego(
    control: Control, matched: list[StoredEntry], start_us: int, end_us: int
) -> tuple[str, str, list[int]]:
    ev = control.evidence
    docs = []
    for s in matched:
        doc = entry_json(s.entry)
        doc["index"] = s.entry.index
        docs.append(doc)
    compiled = CompiledBundle({f"{control.id}.rego": ev.policy}, {})
    try:
        decision = compiled.evaluate(
            ev.rule.strip("/"),
            {"entries": docs, "start_time": _rfc3339(start_us), "end_time": _rfc3339(end_us)},
        )
    except EvaluationError as err:
        return "error", str(err), []
    value = decision.value if decision.defined else None
    if not isinstance(value, dict) or value.get("result") not in RESULTS:
        return "error", f"rule {ev.rule} did not return {{result, message, evidence}}", []
    indexes = [int(i) for i in value.get("evidence") or () if isinstance(i, int | float)]
    return str(value["result"]), str(value.get("message", "")), indexes


async def generate(
    audit: AuditLog,
    controls: Sequence[Control],
    start_us: int,
    end_us: int,
    frameworks: Sequence[str] = (),
) -> ComplianceReport:
    """Evaluate ``controls`` over the entries whose time is in [start_us, end_us)."""
    if end_us <= start_us:
        raise InvalidArgument(
            "end_time must be after start_time",
            field_violations=[FieldViolation("end_time", "must be after start_time")],
        )
    checkpoint = await audit.checkpoint()
    size = checkpoint.body.size
    indexes = [i for i in await audit.store.by_time(start_us, end_us) if i < size]
    too_many = len(indexes) > MAX_REPORT_ENTRIES
    entries: list[StoredEntry] = []
    if not too_many:
        for at in range(0, len(indexes), 1000):
            entries += await audit.entries(indexes[at : at + 1000])
    results: list[ControlResult] = []
    for control in controls:
        if too_many:
            results.append(
                ControlResult(
                    control,
                    "error",
                    f"{len(indexes)} entries in range (limit {MAX_REPORT_ENTRIES}); narrow the range",
                )
            )
            continue
        matched = _matching(control, entries)
        if control.evidence.kind == "query":
            result, message, chosen = _decide_query(control, matched)
        else:
            result, message, chosen = _decide_rego(control, matched, start_us, end_us)
        by_index = {s.entry.index: s for s in matched}
        picked = [by_index[i] for i in chosen if i in by_index][: control.evidence.max_evidence]
        proofs = await asyncio.gather(*(audit.inclusion_proof(s.entry.index, size) for s in picked))
        results.append(
            ControlResult(
                control,
                result,
                message,
                [ProvenEntry(s, p) for s, (_, p) in zip(picked, proofs, strict=True)],
                matched=len(matched),
            )
        )
    return ComplianceReport(
        start_us=start_us,
        end_us=end_us,
        generate_ns=time.time_ns(),
        frameworks=tuple(frameworks),
        results=results,
        checkpoint=checkpoint,
        verifier_key=audit.verifier.vkey(),
    )


def verify_evidence(report: ComplianceReport) -> list[str]:
    """Check every evidence proof against the report's checkpoint; return what fails."""
    failures = []
    root, size = report.checkpoint.body.root_hash, report.checkpoint.body.size
    for r in report.results:
        for ev in r.evidence:
            i = ev.stored.entry.index
            if merkle.leaf_hash(ev.stored.data) != ev.stored.leaf_hash:
                failures.append(f"{r.control.id}: entry {i}: bytes do not hash to its leaf")
            elif not merkle.verify_inclusion(i, size, ev.stored.leaf_hash, ev.proof, root):
                failures.append(f"{r.control.id}: entry {i}: inclusion proof fails")
    return failures


def _rfc3339(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def to_policy_report(
    report: ComplianceReport, name: str = "autoecoops-compliance"
) -> dict[str, Any]:
    """The report as a wgpolicyk8s.io/v1alpha2 ClusterPolicyReport document."""
    stamp = report.generate_ns // 1_000_000_000
    return {
        "apiVersion": "wgpolicyk8s.io/v1alpha2",
        "kind": "ClusterPolicyReport",
        "metadata": {"name": name},
        "summary": report.summary(),
        "results": [
            {
                "source": "autoecoops",
                "policy": r.control.id,
                "rule": r.control.title,
                "result": r.result,
                "message": r.message,
                "timestamp": {"seconds": stamp, "nanos": 0},
                "properties": {fw: ",".join(ids) for fw, ids in sorted(r.control.mappings.items())}
                | {"evidence": ",".join(str(e.stored.entry.index) for e in r.evidence)},
            }
            for r in report.results
        ],
    }


_STYLE = """
body{font:14px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dde6;padding-bottom:.3rem}
.meta{color:#5a6478}table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{border:1px solid #d8dde6;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f5f9}.pill{display:inline-block;padding:0 .6rem;border-radius:1rem;font-weight:600;font-size:.85rem;text-transform:uppercase}
.pass{background:#d9f2e1;color:#17663a}.fail{background:#fbdcdc;color:#9b1c1c}.warn{background:#fdf0cf;color:#8a5a00}.error{background:#ead9f7;color:#5b2191}.skip{background:#e7e9ee;color:#4b5565}
.summary td{text-align:center;font-size:1.3rem;font-weight:600}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem}
pre{background:#f6f8fa;border:1px solid #d8dde6;padding:.6rem;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.control{border:1px solid #d8dde6;border-radius:6px;padding:.2rem 1rem 1rem;margin:1rem 0}.small{font-size:.85rem;color:#5a6478}
"""


def render_html(report: ComplianceReport) -> str:
    """A self-contained HTML page of the report, for people (auditors) to read."""
    e = html.escape
    summary = report.summary()
    cp = report.checkpoint
    fw = ", ".join(report.frameworks) or "all (" + ", ".join(FRAMEWORKS) + ")"
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>AutoEcoOps compliance report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>AutoEcoOps compliance report</h1>",
        f"<p class='meta'>Period <b>{e(_rfc3339(report.start_us))}</b> to <b>{e(_rfc3339(report.end_us))}</b> "
        f"(end exclusive) · generated {e(_rfc3339(report.generate_ns // 1000))} · frameworks: {e(fw)}</p>",
        "<table class='summary'><tr>",
        *(f"<th><span class='pill {r}'>{r}</span></th>" for r in RESULTS),
        "</tr><tr>",
        *(f"<td>{summary[r]}</td>" for r in RESULTS),
        "</tr></table>",
        "<h2>Controls</h2><table><tr><th>Control</th><th>Result</th><th>SOC 2</th><th>CIS</th><th>NIST 800-53</th><th>Finding</th></tr>",
    ]
    for r in report.results:
        m = r.control.mappings
        out.append(
            f"<tr><td><a href='#{e(r.control.id)}'>{e(r.control.title)}</a><br><code>{e(r.control.id)}</code></td>"
            f"<td><span class='pill {r.result}'>{r.result}</span></td>"
            f"<td>{e(', '.join(m.get('SOC2', ())))}</td><td>{e(', '.join(m.get('CIS', ())))}</td>"
            f"<td>{e(', '.join(m.get('NIST-800-53', ())))}</td><td>{e(r.message)}</td></tr>"
        )
    out.append("</table>")
    for r in report.results:
        out.append(f"<div class='control' id='{e(r.control.id)}'>")
        out.append(f"<h2>{e(r.control.title)} <span class='pill {r.result}'>{r.result}</span></h2>")
        out.append(f"<p>{e(r.control.description)}</p><p><b>Finding:</b> {e(r.message)}</p>")
        out.append(
            f"<p class='small'>{r.matched} matching entries in the period; "
            f"{len(r.evidence)} shown as evidence, each provable against the checkpoint below.</p>"
        )
        if r.evidence:
            out.append(
                "<table><tr><th>#</th><th>Time</th><th>Type</th><th>Actor</th><th>Action</th>"
                "<th>Resource</th><th>Outcome</th><th>Leaf hash</th></tr>"
            )
            for ev in r.evidence:
                en = ev.stored.entry
                out.append(
                    f"<tr><td>{en.index}</td><td>{e(en.time.ToJsonString())}</td><td>{e(en.type)}</td>"
                    f"<td>{e(en.actor.subject)}</td><td>{e(en.action)}</td><td>{e(en.resource)}</td>"
                    f"<td>{e(audit_outcome(ev.stored).removeprefix('OUTCOME_').lower())}</td>"
                    f"<td><code>{ev.stored.leaf_hash.hex()[:16]}…</code></td></tr>"
                )
            out.append("</table>")
        out.append("</div>")
    out += [
        "<h2>How to verify this report</h2>",
        "<p>Every evidence entry is a leaf of the audit log's RFC 6962 Merkle tree. The checkpoint below is "
        "signed (C2SP signed note, Ed25519) by the log's key. Check the signature with the verifier key, "
        "recompute each leaf hash as SHA-256(0x00 ‖ entry bytes) from the JSON report, and check its "
        "inclusion proof against the checkpoint's root; or run <code>autoecoops audit verify</code> "
        "to check the whole log.</p>",
        f"<p><b>Checkpoint</b> (tree size {cp.body.size}, signed {e(_rfc3339(cp.time_ns // 1000))}):</p>",
        f"<pre>{e(cp.note)}</pre>",
        f"<p><b>Verifier key</b></p><pre>{e(report.verifier_key)}</pre>",
        "</body></html>",
    ]
    return "\n".join(out)


def to_json(report: ComplianceReport) -> dict[str, Any]:
    """The report as JSON, with evidence bytes and proofs (base64) for independent checking."""
    import base64

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return {
        "startTime": _rfc3339(report.start_us),
        "endTime": _rfc3339(report.end_us),
        "generateTime": _rfc3339(report.generate_ns // 1000),
        "frameworks": list(report.frameworks),
        "summary": report.summary(),
        "checkpoint": {
            "origin": report.checkpoint.body.origin,
            "treeSize": str(report.checkpoint.body.size),
            "rootHash": b64(report.checkpoint.body.root_hash),
            "signedNote": report.checkpoint.note,
        },
        "verifierKey": report.verifier_key,
        "controls": [
            {
                "controlId": r.control.id,
                "title": r.control.title,
                "mappings": [
                    {"framework": fw, "controlId": cid}
                    for fw, ids in r.control.mappings.items()
                    for cid in ids
                ],
                "result": r.result,
                "message": r.message,
                "evidence": [
                    {
                        "entry": json.loads(ev.stored.data),
                        "entryBytes": b64(ev.stored.data),
                        "leafHash": b64(ev.stored.leaf_hash),
                        "inclusionProof": [b64(p) for p in ev.proof],
                    }
                    for ev in r.evidence
                ],
            }
            for r in report.results
        ],
    }
