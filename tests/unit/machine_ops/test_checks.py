"""Controls observed on this very machine, compared with what the test reads itself."""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from pathlib import Path

import pytest

from autoecoops.platforms.machine_ops.checks import Host, evaluate, read_packages
from autoecoops.platforms.machine_ops.model import Check, Control
from autoecoops.platforms.machine_ops.profile import builtin_baseline, builtin_controls

CONTROLS = builtin_controls()


def run(control: Control, host: Host | None = None):
    return evaluate(host or Host(), "baselines/t", 1, control)


def test_builtin_profile_has_at_least_30_valid_controls_with_sources() -> None:
    from autoecoops.platforms.machine_ops.model import validate_controls

    assert len(CONTROLS) >= 30
    validate_controls(CONTROLS)
    for c in CONTROLS:
        assert c.title and c.rationale and c.remediation, c.id
        assert any(t.startswith(("cis:", "devsec:")) for t in c.tags), c.id
    kinds = {c.check.kind for c in CONTROLS}
    assert {
        "sysctl",
        "file_mode",
        "file_owner",
        "file_content",
        "package_absent",
        "service_enabled",
        "kernel_module_disabled",
        "mount_option",
    } <= kinds


@pytest.mark.parametrize(
    "control", [c for c in CONTROLS if c.check.kind == "sysctl"], ids=lambda c: c.id
)
def test_sysctl_controls_match_proc_sys(control: Control) -> None:
    path = Path("/proc/sys") / control.check.key.replace(".", "/")
    r = run(control)
    if not path.exists():
        assert (r.status, r.observed) == ("fail", "(absent)")
        return
    truth = " ".join(path.read_text().split())
    assert r.observed == truth
    ok = (
        bool(re.search(control.check.expected, truth))
        if control.check.operator == "matches"
        else truth == control.check.expected
    )
    assert r.status == ("pass" if ok else "fail")


@pytest.mark.parametrize(
    "control",
    [c for c in CONTROLS if c.check.kind in ("file_mode", "file_owner")],
    ids=lambda c: c.id,
)
def test_file_controls_match_stat(control: Control) -> None:
    r = run(control)
    p = control.check.key
    if not os.path.exists(p):
        assert r.status == ("pass" if control.check.pass_if_missing else "fail")
        return
    st = os.stat(p)
    if control.check.kind == "file_mode":
        mode = stat.S_IMODE(st.st_mode)
        assert r.observed == f"{mode:04o}"
        assert r.status == ("pass" if mode & ~int(control.check.expected, 8) == 0 else "fail")
    else:
        owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
        assert r.observed == owner
        assert r.status == ("pass" if re.search(control.check.expected, owner) else "fail")


def test_package_controls_match_dpkg_status() -> None:
    if not Path("/var/lib/dpkg/status").exists():
        pytest.skip("no dpkg here")
    text = Path("/var/lib/dpkg/status").read_text()
    installed = set(re.findall(r"^Package: (\S+)\nStatus: install ok installed", text, re.M))
    pkgs = read_packages(Host())
    assert installed <= set(pkgs)
    for c in (c for c in CONTROLS if c.check.kind == "package_absent"):
        assert run(c).status == ("fail" if c.check.key in installed else "pass")
    present = sorted(installed)[0]
    r = run(Control("p", Check("package_installed", present)))
    assert (r.status, r.observed) == ("pass", pkgs[present])
    r = run(Control("v", Check("package_version", present, f">={pkgs[present]}")))
    assert r.status == "pass"
    r = run(Control("v2", Check("package_version", present, f"<{pkgs[present]}")))
    assert r.status == "fail"


def test_mount_controls_match_proc_mounts() -> None:
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        mounts[parts[1]] = parts[3].split(",")
    for c in (c for c in CONTROLS if c.check.kind == "mount_option"):
        r = run(c)
        if c.check.key not in mounts:
            assert (r.status, r.observed) == ("fail", "(absent)")
        else:
            assert r.status == ("pass" if c.check.expected in mounts[c.check.key] else "fail")


def test_services_skip_without_systemd_never_guess() -> None:
    r = run(Control("s", Check("service_enabled", "cups.service", "false")))
    if not Path("/run/systemd/system").exists():
        assert r.status == "skip" and "systemd" in r.message
    else:
        assert r.status in ("pass", "fail")


def test_root_only_controls_skip_for_a_non_root_agent() -> None:
    shadow = next(c for c in CONTROLS if c.id == "file-10")
    r = run(shadow, Host(root=False))
    assert r.status == "skip" and "root" in r.message
    if os.geteuid() == 0:
        assert run(shadow, Host(root=True)).status in ("pass", "fail")


def test_file_content_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "conf"
    f.write_text("PermitRootLogin no\nX 1\n")
    ok = run(Control("c", Check("file_content", str(f), r"^PermitRootLogin\s+no", "matches")))
    assert (ok.status, ok.observed) == ("pass", "PermitRootLogin no")
    bad = run(Control("c", Check("file_content", str(f), r"^X 1$", "not_matches")))
    assert bad.status == "fail"
    missing = run(Control("c", Check("file_content", str(tmp_path / "nope"), "x")))
    assert missing.status == "fail" and missing.observed == "(absent)"
    d = tmp_path / "dir"
    d.mkdir()
    err = run(Control("c", Check("file_content", str(d), "x")))
    assert err.status == "error" and "IsADirectory" in err.message


def test_named_command_output() -> None:
    r = run(
        Control("k", Check("command_output", "kernel-release", "^" + re.escape(os.uname().release)))
    )
    assert (r.status, r.observed) == ("pass", os.uname().release)


def test_kernel_module_loaded_matches_proc_modules() -> None:
    loaded = (
        {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
        if Path("/proc/modules").exists()
        else set()
    )
    r = run(Control("m", Check("kernel_module_loaded", "dccp", "false")))
    assert r.status == ("fail" if "dccp" in loaded or Path("/sys/module/dccp").exists() else "pass")


def test_builtin_baseline_shape() -> None:
    b = builtin_baseline()
    assert b.name == "baselines/linux-hardening" and b.node_selector == ""
