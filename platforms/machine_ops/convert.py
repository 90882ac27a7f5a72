"""Proto <-> domain translation for MachineNativeOps (the service's only vocabulary bridge)."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from autoecoops.common.v1 import types_pb2
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.platforms.machine_ops.inventory import Tables
from autoecoops.platforms.machine_ops.model import Baseline, Check, Control, Result


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp of epoch seconds."""
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def seconds(t: timestamp_pb2.Timestamp) -> float:
    """Epoch seconds of a Timestamp."""
    return float(t.ToNanoseconds()) / 1e9


def severity_pb(name: str) -> types_pb2.Severity.ValueType:
    """The common Severity of a severity name."""
    return types_pb2.Severity.Value(f"SEVERITY_{name.upper()}")


def severity_name(value: int) -> str:
    """The severity name of a common Severity."""
    return types_pb2.Severity.Name(value).removeprefix("SEVERITY_").lower()  # type: ignore[arg-type]


def check_from_pb(c: pb.Check) -> Check:
    """The domain Check of a proto one ('' for unspecified enums)."""
    kind = pb.CheckKind.Name(c.kind).removeprefix("CHECK_KIND_").lower()
    op = pb.Operator.Name(c.operator).removeprefix("OPERATOR_").lower()
    return Check(
        kind="" if kind == "unspecified" else kind,
        key=c.key,
        expected=c.expected,
        operator="" if op == "unspecified" else op,
        pass_if_missing=c.pass_if_missing,
    )


def check_to_pb(c: Check) -> pb.Check:
    """The proto Check of a domain one."""
    return pb.Check(
        kind=pb.CheckKind.Value(f"CHECK_KIND_{c.kind.upper()}") if c.kind else 0,  # type: ignore[arg-type]
        key=c.key,
        expected=c.expected,
        operator=pb.Operator.Value(f"OPERATOR_{c.operator.upper()}") if c.operator else 0,  # type: ignore[arg-type]
        pass_if_missing=c.pass_if_missing,
    )


def control_from_pb(c: pb.Control) -> Control:
    """The domain Control of a proto one."""
    return Control(
        id=c.id,
        title=c.title,
        description=c.description,
        impact=c.impact,
        tags=tuple(c.tags),
        rationale=c.rationale,
        remediation=c.remediation,
        check=check_from_pb(c.check),
        requires_root=c.requires_root,
        remediable=c.remediable,
    )


def control_to_pb(c: Control) -> pb.Control:
    """The proto Control of a domain one (severity derived from impact)."""
    return pb.Control(
        id=c.id,
        title=c.title,
        description=c.description,
        impact=c.impact,
        severity=severity_pb(c.severity),
        tags=list(c.tags),
        rationale=c.rationale,
        remediation=c.remediation,
        check=check_to_pb(c.check),
        requires_root=c.requires_root,
        remediable=c.remediable,
    )


def baseline_to_pb(b: Baseline) -> pb.Baseline:
    """The proto Baseline of a domain one."""
    out = pb.Baseline(
        name=b.name,
        title=b.title,
        description=b.description,
        node_selector=b.node_selector,
        controls=[control_to_pb(c) for c in b.controls],
        version=b.version,
        etag=b.etag,
    )
    if b.create_time:
        out.create_time.CopyFrom(ts(b.create_time))
        out.update_time.CopyFrom(ts(b.update_time))
    return out


def baseline_from_pb(b: pb.Baseline) -> Baseline:
    """The domain Baseline of a proto one."""
    return Baseline(
        name=b.name,
        controls=[control_from_pb(c) for c in b.controls],
        title=b.title,
        description=b.description,
        node_selector=b.node_selector,
        version=b.version or 1,
        etag=b.etag,
        create_time=seconds(b.create_time) if b.HasField("create_time") else 0.0,
        update_time=seconds(b.update_time) if b.HasField("update_time") else 0.0,
    )


_STATUS = {"pass": 1, "fail": 2, "error": 3, "skip": 4}
_STATUS_NAME = {v: k for k, v in _STATUS.items()}


def status_pb(name: str) -> pb.ResultStatus.ValueType:
    """The ResultStatus of a status name."""
    return _STATUS.get(name, 0)  # type: ignore[return-value]


def status_name(value: int) -> str:
    """The status name of a ResultStatus ('' when unspecified)."""
    return _STATUS_NAME.get(value, "")


def result_to_pb(r: Result) -> pb.ControlResult:
    """The proto ControlResult of a domain one."""
    return pb.ControlResult(
        baseline=r.baseline,
        baseline_version=r.baseline_version,
        control_id=r.control_id,
        status=status_pb(r.status),
        expected=r.expected,
        observed=r.observed,
        severity=severity_pb(r.severity),
        message=r.message,
        title=r.title,
    )


def result_from_pb(r: pb.ControlResult) -> Result:
    """The domain Result of a proto one."""
    return Result(
        baseline=r.baseline,
        control_id=r.control_id,
        status=status_name(r.status),
        expected=r.expected,
        observed=r.observed,
        severity=severity_name(r.severity) if r.severity else "medium",
        message=r.message,
        title=r.title,
        baseline_version=r.baseline_version,
    )


def tables_to_pb(tables: Tables) -> list[pb.InventoryTable]:
    """Proto tables of domain ones."""
    return [
        pb.InventoryTable(name=name, rows=[pb.InventoryRow(columns=row) for row in rows])
        for name, rows in sorted(tables.items())
    ]


def tables_from_pb(tables: Sequence[pb.InventoryTable]) -> Tables:
    """Domain tables of proto ones."""
    return {t.name: [dict(r.columns) for r in t.rows] for t in tables}


def condition(
    type_: str, status: bool | None, reason: str, message: str, since: float, severity: str = ""
) -> types_pb2.Condition:
    """A Kubernetes-shaped condition."""
    st = (
        types_pb2.CONDITION_STATUS_UNKNOWN
        if status is None
        else types_pb2.CONDITION_STATUS_TRUE
        if status
        else types_pb2.CONDITION_STATUS_FALSE
    )
    out = types_pb2.Condition(type=type_, status=st, reason=reason, message=message)
    if since:
        out.last_transition_time.CopyFrom(ts(since))
    if severity:
        out.severity = severity_pb(severity)
    return out
