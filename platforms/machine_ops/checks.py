"""Observing a control on this machine: /proc/sys, the file system, dpkg/rpm,
systemd, kernel modules, mounts and a short allow-list of named commands.

The agent runs this; nothing here talks to the network. A value that cannot
be read is ERROR with the reason; a control that does not apply here (no
systemd, no package database, needs root while we are not) is SKIP with the
reason. Nothing is ever guessed.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autoecoops.platforms.machine_ops.model import ERROR, FAIL, PASS, SKIP, Control, Result
from autoecoops.platforms.machine_ops.versions import parse_constraint, satisfies

#: Commands a COMMAND_OUTPUT control may name: a fixed argv, never a shell,
#: so a baseline cannot make the agent run something arbitrary.
NAMED_COMMANDS: Mapping[str, tuple[str, ...]] = {
    "kernel-release": ("uname", "-r"),
    "sshd-effective-config": ("sshd", "-T"),
    "dpkg-audit": ("dpkg", "--audit"),
    "login-shells": ("cat", "/etc/shells"),
    "root-path": ("sh", "-c", "echo $PATH"),
}
#: Named commands whose output needs root (sshd -T reads host keys).
ROOT_COMMANDS = frozenset({"sshd-effective-config"})
COMMAND_TIMEOUT = 10.0
MODPROBE_DIRS = ("/etc/modprobe.d", "/usr/lib/modprobe.d", "/lib/modprobe.d", "/run/modprobe.d")


class _Skip(Exception):
    """The control does not apply here; the message says why."""


class _Missing(Exception):
    """The observed object does not exist."""


@dataclass
class Host:
    """Where the machine's facts are read from (the real root by default)."""

    proc: Path = Path("/proc")
    etc: Path = Path("/etc")
    root: bool = field(default_factory=lambda: os.geteuid() == 0)
    dpkg_status: Path = Path("/var/lib/dpkg/status")
    systemd_dir: Path = Path("/run/systemd/system")
    run: Callable[[tuple[str, ...]], tuple[int, str]] | None = None
    _packages: dict[str, str] | None = None

    def command(self, argv: tuple[str, ...]) -> tuple[int, str]:
        """Run ``argv`` (no shell unless the argv says so); (exit code, stdout+stderr)."""
        if self.run is not None:
            return self.run(argv)
        if shutil.which(argv[0]) is None:
            raise _Skip(f"{argv[0]} is not installed")
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        return proc.returncode, (proc.stdout + proc.stderr)

    def packages(self) -> dict[str, str]:
        """Installed packages -> version, from dpkg's status file or rpm."""
        if self._packages is None:
            self._packages = read_packages(self)
        return self._packages


def read_packages(host: Host) -> dict[str, str]:
    """Installed packages from dpkg's status database (no subprocess), else rpm -qa."""
    if host.dpkg_status.exists():
        out: dict[str, str] = {}
        name = version = status = ""
        for line in [*host.dpkg_status.read_text(errors="replace").splitlines(), ""]:
            if not line:
                if name and status.endswith(" installed"):
                    out[name] = version
                name = version = status = ""
            elif line.startswith("Package: "):
                name = line[9:].strip()
            elif line.startswith("Version: "):
                version = line[9:].strip()
            elif line.startswith("Status: "):
                status = line[8:].strip()
        return out
    if shutil.which("rpm"):
        code, text = host.command(
            ("rpm", "-qa", "--qf", "%{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE}\n")
        )
        if code == 0:
            return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    raise _Skip("no package database (neither dpkg nor rpm) on this node")


def _norm(value: str) -> str:
    return " ".join(value.split())


def _compare(observed: str, expected: str, operator: str, default: str) -> bool:
    op = operator or default
    if op == "equals":
        return _norm(observed) == _norm(expected)
    if op == "not_equals":
        return _norm(observed) != _norm(expected)
    found = re.search(expected, observed, re.MULTILINE) is not None
    return found if op == "matches" else not found


def _bool(expected: str) -> bool:
    return expected != "false"


def _read_file(host: Host, path: str, control: Control) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except PermissionError:
        if not host.root:
            raise _Skip(f"reading {path} needs root; the agent is not root") from None
        raise
    except FileNotFoundError:
        raise _Missing(path) from None


def _sysctl(host: Host, c: Control) -> tuple[bool, str]:
    path = host.proc / "sys" / c.check.key.replace(".", "/")
    try:
        observed = _norm(path.read_text())
    except FileNotFoundError:
        raise _Missing(f"the kernel has no sysctl {c.check.key}") from None
    except PermissionError:
        if not host.root:
            raise _Skip(f"reading {c.check.key} needs root; the agent is not root") from None
        raise
    return _compare(observed, c.check.expected, c.check.operator, "equals"), observed


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise _Missing(f"{path} does not exist") from None


def _file_exists(host: Host, c: Control) -> tuple[bool, str]:
    exists = os.path.lexists(c.check.key)
    return exists == _bool(c.check.expected), str(exists).lower()


def _file_mode(host: Host, c: Control) -> tuple[bool, str]:
    mode = stat.S_IMODE(_stat(c.check.key).st_mode)
    observed = f"{mode:04o}"
    limit = int(c.check.expected, 8)
    if c.check.operator == "equals":
        return mode == limit, observed
    # The default: no permission bit beyond the expected ones (CIS "or more restrictive").
    return mode & ~limit == 0, observed


def _file_owner(host: Host, c: Control) -> tuple[bool, str]:
    st = _stat(c.check.key)
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    observed = f"{user}:{group}"
    return _compare(observed, c.check.expected, c.check.operator, "equals"), observed


def _file_content(host: Host, c: Control) -> tuple[bool, str]:
    if c.requires_root and not host.root:
        raise _Skip(f"reading {c.check.key} needs root; the agent is not root")
    text = _read_file(host, c.check.key, c)
    op = c.check.operator or "matches"
    m = re.search(c.check.expected, text, re.MULTILINE)
    # Observed: the line that matched (redacted to its first field for
    # secrets files), or what was looked for and not found.
    if m:
        line = text[text.rfind("\n", 0, m.start()) + 1 :].split("\n", 1)[0]
        observed = line.split(":", 1)[0] + ":..." if "shadow" in c.check.key else line.strip()
    else:
        observed = "(no match)"
    ok = (m is not None) if op == "matches" else (m is None)
    if op in ("equals", "not_equals"):
        ok = _compare(text, c.check.expected, op, "equals")
        observed = _norm(text)[:200]
    return ok, observed[:200]


def _package(host: Host, c: Control) -> tuple[bool, str]:
    version = host.packages().get(c.check.key)
    kind = c.check.kind
    if kind == "package_installed":
        return version is not None, version or "(not installed)"
    if kind == "package_absent":
        return version is None, version or "(not installed)"
    if version is None:
        raise _Missing(f"package {c.check.key} is not installed")
    op, wanted = parse_constraint(c.check.expected)
    return satisfies(version, op, wanted), version


def _service(host: Host, c: Control) -> tuple[bool, str]:
    if not host.systemd_dir.exists():
        raise _Skip("systemd is not running on this node (no /run/systemd/system)")
    verb = "is-enabled" if c.check.kind == "service_enabled" else "is-active"
    _, out = host.command(("systemctl", verb, c.check.key))
    state = out.strip().splitlines()[-1] if out.strip() else "unknown"
    on = state in ("enabled", "enabled-runtime", "static", "alias", "indirect", "active")
    return on == _bool(c.check.expected), state


def _loaded_modules(host: Host) -> set[str]:
    text = (host.proc / "modules").read_text() if (host.proc / "modules").exists() else ""
    return {line.split()[0] for line in text.splitlines() if line.strip()}


def _module_loaded(host: Host, c: Control) -> tuple[bool, str]:
    name = c.check.key.replace("-", "_")
    loaded = name in _loaded_modules(host) or Path("/sys/module", name).exists()
    return loaded == _bool(c.check.expected), str(loaded).lower()


def _module_disabled(host: Host, c: Control) -> tuple[bool, str]:
    """CIS's audit: not loaded, and modprobe would run /bin/true or /bin/false instead."""
    name = c.check.key.replace("-", "_")
    if name in _loaded_modules(host):
        return (not _bool(c.check.expected)), "loaded"
    install = blacklisted = False
    pattern = re.compile(rf"^\s*install\s+{re.escape(c.check.key)}\s+(/usr)?/bin/(true|false)\b")
    black = re.compile(rf"^\s*blacklist\s+{re.escape(c.check.key)}\s*$")
    for d in MODPROBE_DIRS:
        for f in sorted(Path(d).glob("*.conf")) if Path(d).is_dir() else []:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                install = install or bool(pattern.match(line))
                blacklisted = blacklisted or bool(black.match(line))
    if install:
        observed = "install /bin/false"
    elif blacklisted:
        observed = "blacklisted (loadable as a dependency)"
    else:
        observed = "loadable"
    return install == _bool(c.check.expected), observed


def _mount_option(host: Host, c: Control) -> tuple[bool, str]:
    point = c.check.key.rstrip("/") or "/"
    options = ""
    for line in (host.proc / "self" / "mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == point:
            options = parts[3]  # the last mount on the point wins, as the kernel shows it
    if not options:
        raise _Missing(f"{point} is not a separate mount")
    opts = options.split(",")
    wanted = c.check.expected
    ok = (wanted in opts) if c.check.operator != "not_equals" else (wanted not in opts)
    return ok, options


def _command(host: Host, c: Control) -> tuple[bool, str]:
    if c.check.key in ROOT_COMMANDS and not host.root:
        raise _Skip(f"{c.check.key} needs root; the agent is not root")
    code, out = host.command(NAMED_COMMANDS[c.check.key])
    ok = _compare(out, c.check.expected, c.check.operator, "matches")
    first = out.strip().splitlines()[0] if out.strip() else f"(exit {code}, no output)"
    return ok, first[:200]


_OBSERVERS: Mapping[str, Callable[[Host, Control], tuple[bool, str]]] = {
    "sysctl": _sysctl,
    "file_exists": _file_exists,
    "file_mode": _file_mode,
    "file_owner": _file_owner,
    "file_content": _file_content,
    "package_installed": _package,
    "package_absent": _package,
    "package_version": _package,
    "service_enabled": _service,
    "service_running": _service,
    "kernel_module_loaded": _module_loaded,
    "kernel_module_disabled": _module_disabled,
    "mount_option": _mount_option,
    "command_output": _command,
}


def evaluate(host: Host, baseline: str, version: int, control: Control) -> Result:
    """The result of ``control`` on ``host``."""

    def result(status: str, observed: str = "", message: str = "") -> Result:
        return Result(
            baseline=baseline,
            baseline_version=version,
            control_id=control.id,
            status=status,
            expected=control.check.expected,
            observed=observed,
            severity=control.severity,
            message=message,
            title=control.title,
        )

    try:
        ok, observed = _OBSERVERS[control.check.kind](host, control)
    except _Skip as why:
        return result(SKIP, message=str(why))
    except _Missing as why:
        if control.check.pass_if_missing:
            return result(PASS, "(absent)", f"{why}: passes when absent")
        return result(FAIL, "(absent)", str(why))
    except subprocess.TimeoutExpired:
        return result(ERROR, message=f"command timed out after {COMMAND_TIMEOUT:.0f}s")
    except (OSError, ValueError, KeyError) as err:
        return result(ERROR, message=f"{type(err).__name__}: {err}")
    return result(
        PASS if ok else FAIL, observed, "" if ok else f"expected {control.check.expected or 'true'}"
    )


def remediate_sysctl(host: Host, control: Control, dry_run: bool) -> tuple[bool, str, str]:
    """Write a sysctl's expected value: (changed, before, after). Root only."""
    path = host.proc / "sys" / control.check.key.replace(".", "/")
    before = _norm(path.read_text())
    if dry_run or before == _norm(control.check.expected):
        return False, before, control.check.expected if dry_run else before
    if not host.root:
        raise PermissionError(f"writing {control.check.key} needs root; the agent is not root")
    path.write_text(control.check.expected + "\n")
    return True, before, _norm(path.read_text())
