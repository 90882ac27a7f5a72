"""Import of InSpec-style YAML control lists.

Accepted shapes: a list of controls, or a mapping with ``title``,
``description``, ``node_selector`` and ``controls``. A control::

    - id: sysctl-01
      title: IPv4 forwarding is disabled
      impact: 0.7
      tags: {cis: "3.1.1", level: 1}      # or a list: ["cis:3.1.1", "level1"]
      desc: ...                           # or description
      rationale: ...
      remediation: ...                    # or fix
      requires_root: false
      remediable: true
      check: {kind: sysctl, key: net.ipv4.ip_forward, expected: "0"}

Instead of ``check`` a control may use InSpec's resource shorthand:
``kernel_parameter: {name: net.ipv4.ip_forward, value: 0}``,
``file: {path: /etc/shadow, mode: "0640"}`` / ``{path, owner: root:shadow}`` /
``{path, content: regex}`` / ``{path, exists: true}``, ``package: {name,
installed: false}`` / ``{name, version: ">=3.0.13"}``, ``service: {name,
enabled: false}`` / ``{name, running: false}``, ``kernel_module: {name,
disabled: true}`` / ``{name, loaded: false}``, ``mount: {path: /tmp,
option: nodev}``, ``command: {name: kernel-release, match: regex}``.
Errors name the control's index and field, as BadRequest field violations.
"""

from __future__ import annotations

from typing import Any

import yaml

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument
from autoecoops.platforms.machine_ops.model import Check, Control, validate_controls


def _bad(field: str, why: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {why}", reason="INVALID_CONTROL", field_violations=[FieldViolation(field, why)]
    )


def _s(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "" if v is None else str(v)


def _check(entry: dict[str, Any], path: str) -> Check:
    if "check" in entry:
        c = entry["check"]
        if not isinstance(c, dict):
            raise _bad(f"{path}.check", "must be a mapping")
        return Check(
            kind=_s(c.get("kind")).lower(),
            key=_s(c.get("key")),
            expected=_s(c.get("expected")),
            operator=_s(c.get("operator")).lower(),
            pass_if_missing=bool(c.get("pass_if_missing", False)),
        )
    if "kernel_parameter" in entry:
        r = entry["kernel_parameter"]
        return Check("sysctl", _s(r.get("name")), _s(r.get("value")))
    if "file" in entry:
        r = entry["file"]
        p = _s(r.get("path"))
        missing = bool(r.get("pass_if_missing", False))
        if "mode" in r:
            mode = r["mode"]
            return Check(
                "file_mode",
                p,
                f"{mode:04o}" if isinstance(mode, int) else _s(mode).replace("0o", "0", 1),
                pass_if_missing=missing,
            )
        if "owner" in r:
            return Check("file_owner", p, _s(r["owner"]), pass_if_missing=missing)
        if "content" in r:
            return Check("file_content", p, _s(r["content"]), "matches", missing)
        if "not_content" in r:
            return Check("file_content", p, _s(r["not_content"]), "not_matches", missing)
        return Check("file_exists", p, _s(r.get("exists", True)))
    if "package" in entry:
        r = entry["package"]
        if "version" in r:
            return Check("package_version", _s(r.get("name")), _s(r["version"]))
        return Check(
            "package_installed" if r.get("installed", True) else "package_absent", _s(r.get("name"))
        )
    if "service" in entry:
        r = entry["service"]
        if "running" in r:
            return Check("service_running", _s(r.get("name")), _s(r["running"]))
        return Check("service_enabled", _s(r.get("name")), _s(r.get("enabled", True)))
    if "kernel_module" in entry:
        r = entry["kernel_module"]
        if "loaded" in r:
            return Check("kernel_module_loaded", _s(r.get("name")), _s(r["loaded"]))
        return Check("kernel_module_disabled", _s(r.get("name")), _s(r.get("disabled", True)))
    if "mount" in entry:
        r = entry["mount"]
        return Check("mount_option", _s(r.get("path")), _s(r.get("option")))
    if "command" in entry:
        r = entry["command"]
        return Check("command_output", _s(r.get("name")), _s(r.get("match")))
    raise _bad(
        path,
        "has no check (check, kernel_parameter, file, package, service, kernel_module, mount or command)",
    )


def _tags(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict):
        return tuple(f"{k}:{v}" if v not in (None, True, "") else str(k) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_s(v) for v in value)
    return (_s(value),) if value else ()


def parse_controls(text: str) -> tuple[dict[str, str], list[Control]]:
    """(baseline fields, controls) of a YAML document; INVALID_ARGUMENT naming the bad field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise _bad("yaml", f"not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    meta: dict[str, str] = {}
    if isinstance(doc, dict):
        meta = {
            k: _s(doc.get(k))
            for k in ("title", "description", "node_selector")
            if doc.get(k) is not None
        }
        doc = doc.get("controls")
    if not isinstance(doc, list) or not doc:
        raise _bad("yaml", "must be a non-empty list of controls, or a mapping with 'controls'")
    controls = []
    for i, entry in enumerate(doc):
        path = f"controls[{i}]"
        if not isinstance(entry, dict):
            raise _bad(path, "must be a mapping")
        try:
            impact = float(entry.get("impact", 0.5))
        except (TypeError, ValueError):
            raise _bad(f"{path}.impact", "must be a number between 0.0 and 1.0") from None
        controls.append(
            Control(
                id=_s(entry.get("id") or entry.get("control")),
                title=_s(entry.get("title")),
                description=_s(entry.get("desc") or entry.get("description")),
                impact=impact,
                tags=_tags(entry.get("tags")),
                rationale=_s(entry.get("rationale")),
                remediation=_s(entry.get("remediation") or entry.get("fix")),
                check=_check(entry, path),
                requires_root=bool(entry.get("requires_root", False)),
                remediable=bool(entry.get("remediable", False)),
            )
        )
    validate_controls(controls, "controls")
    return meta, controls
