"""The domain of MachineNativeOps: controls, baselines and their results, as plain Python.

A control says what is observed on a node (``Check``) and what is expected;
a baseline is a versioned list of controls applied to the nodes its label
selector matches. A result is PASS, FAIL, ERROR (the value could not be
read) or SKIP (not applicable here, or it needs root and the agent is not):
never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

#: The check kinds, as the contract's CheckKind names them (lower case, no prefix).
KINDS = (
    "sysctl",
    "file_exists",
    "file_mode",
    "file_owner",
    "file_content",
    "package_installed",
    "package_absent",
    "package_version",
    "service_enabled",
    "service_running",
    "kernel_module_loaded",
    "kernel_module_disabled",
    "mount_option",
    "command_output",
)
OPERATORS = ("", "equals", "not_equals", "matches", "not_matches")
STATUSES = ("pass", "fail", "error", "skip")
PASS, FAIL, ERROR, SKIP = STATUSES

_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_CONTROL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_BOOL_KINDS = {
    "file_exists",
    "service_enabled",
    "service_running",
    "kernel_module_loaded",
    "kernel_module_disabled",
}


@dataclass(frozen=True, slots=True)
class Check:
    """What a control observes (``kind`` + ``key``) and expects."""

    kind: str
    key: str
    expected: str = ""
    operator: str = ""
    pass_if_missing: bool = False


@dataclass(frozen=True, slots=True)
class Control:
    """One control, as InSpec and the CIS benchmarks describe one."""

    id: str
    check: Check
    title: str = ""
    description: str = ""
    impact: float = 0.5
    tags: tuple[str, ...] = ()
    rationale: str = ""
    remediation: str = ""
    requires_root: bool = False
    remediable: bool = False

    @property
    def severity(self) -> str:
        """InSpec's impact bands: none <0.01, low <0.4, medium <0.7, high <0.9, critical."""
        return severity_of(self.impact)


def severity_of(impact: float) -> str:
    """The severity name (common Severity, lower case) of an InSpec impact."""
    if impact < 0.01:
        return "info"
    if impact < 0.4:
        return "low"
    if impact < 0.7:
        return "medium"
    if impact < 0.9:
        return "high"
    return "critical"


SEVERITY_ORDER = ("info", "low", "medium", "high", "critical")


@dataclass(slots=True)
class Baseline:
    """A versioned list of controls for the nodes ``node_selector`` matches."""

    name: str
    controls: list[Control] = field(default_factory=list)
    title: str = ""
    description: str = ""
    node_selector: str = ""
    version: int = 1
    etag: str = ""
    create_time: float = 0.0
    update_time: float = 0.0


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one control on one node."""

    baseline: str
    control_id: str
    status: str
    expected: str = ""
    observed: str = ""
    severity: str = "medium"
    message: str = ""
    title: str = ""
    baseline_version: int = 0


def check_id(value: str, field_name: str) -> str:
    """A resource id (AIP-122): 1-63 of [a-z0-9-], starting with a letter."""
    if not _ID.match(value or ""):
        raise InvalidArgument(
            f"{field_name} {value!r} is not a valid id",
            reason="INVALID_ID",
            field_violations=[
                FieldViolation(field_name, "1-63 of [a-z0-9-], starting with a letter")
            ],
        )
    return value


def id_of(name: str, collection: str, field_name: str = "name") -> str:
    """The id in ``<collection>/<id>``; INVALID_ARGUMENT for anything else."""
    prefix = collection + "/"
    if not name.startswith(prefix):
        raise InvalidArgument(
            f"{field_name} {name!r} is not of the form {collection}/{{id}}",
            reason="INVALID_NAME",
            field_violations=[FieldViolation(field_name, f"must be {collection}/{{id}}")],
        )
    return check_id(name[len(prefix) :], field_name)


def validate_control(c: Control, path: str) -> list[FieldViolation]:
    """What is wrong with control ``c`` (empty when nothing), fields under ``path``."""
    out: list[FieldViolation] = []
    if not _CONTROL_ID.match(c.id or ""):
        out.append(FieldViolation(f"{path}.id", "1-128 of [A-Za-z0-9._:-]"))
    if not 0.0 <= c.impact <= 1.0:
        out.append(FieldViolation(f"{path}.impact", "must be between 0.0 and 1.0"))
    ck = c.check
    if ck.kind not in KINDS:
        out.append(FieldViolation(f"{path}.check.kind", f"must be one of {', '.join(KINDS)}"))
        return out
    if ck.operator not in OPERATORS:
        out.append(FieldViolation(f"{path}.check.operator", "unknown operator"))
    if not ck.key:
        out.append(FieldViolation(f"{path}.check.key", "is required"))
    if ck.kind.startswith("file_") and ck.key and not ck.key.startswith("/"):
        out.append(FieldViolation(f"{path}.check.key", "must be an absolute path"))
    if ck.kind in _BOOL_KINDS and ck.expected not in ("", "true", "false"):
        out.append(FieldViolation(f"{path}.check.expected", "must be true or false"))
    if ck.kind == "file_mode" and not re.fullmatch(r"0?[0-7]{3,4}", ck.expected):
        out.append(FieldViolation(f"{path}.check.expected", "must be an octal mode, e.g. 0644"))
    if (
        ck.kind == "file_owner"
        and ck.operator in ("", "equals", "not_equals")
        and not re.fullmatch(r"[^:\s]+:[^:\s]+", ck.expected)
    ):
        out.append(FieldViolation(f"{path}.check.expected", "must be user:group"))
    if ck.kind == "package_version":
        from autoecoops.platforms.machine_ops.versions import parse_constraint

        try:
            parse_constraint(ck.expected)
        except ValueError as err:
            out.append(FieldViolation(f"{path}.check.expected", str(err)))
    if ck.kind == "sysctl" and ck.key and not re.fullmatch(r"[a-z0-9_.\-/*]+", ck.key):
        out.append(FieldViolation(f"{path}.check.key", "not a sysctl name"))
    if ck.kind == "command_output":
        from autoecoops.platforms.machine_ops.checks import NAMED_COMMANDS

        if ck.key not in NAMED_COMMANDS:
            out.append(
                FieldViolation(
                    f"{path}.check.key", f"must be a named command: {', '.join(NAMED_COMMANDS)}"
                )
            )
    if ck.operator in ("matches", "not_matches") or ck.kind in ("file_content", "command_output"):
        try:
            re.compile(ck.expected)
        except re.error as err:
            out.append(FieldViolation(f"{path}.check.expected", f"not a regular expression: {err}"))
    if c.remediable and ck.kind != "sysctl":
        out.append(FieldViolation(f"{path}.remediable", "only sysctl controls are remediable"))
    return out


def validate_controls(controls: list[Control], path: str = "baseline.controls") -> None:
    """INVALID_ARGUMENT listing every bad field of ``controls`` (ids must be unique)."""
    out: list[FieldViolation] = []
    seen: set[str] = set()
    for i, c in enumerate(controls):
        out.extend(validate_control(c, f"{path}[{i}]"))
        if c.id in seen:
            out.append(FieldViolation(f"{path}[{i}].id", f"duplicate control id {c.id}"))
        seen.add(c.id)
    if out:
        raise InvalidArgument(
            f"{len(out)} invalid control field(s)", reason="INVALID_CONTROL", field_violations=out
        )
