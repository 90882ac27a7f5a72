"""The built-in baseline: Linux hardening from the CIS Debian Linux Benchmark
and dev-sec's linux-baseline (https://github.com/dev-sec/linux-baseline).

Tags name the source: ``cis:<section>`` for the CIS Debian Linux 12
Benchmark's recommendation, ``devsec:<id>`` for linux-baseline's control.
Only sysctl controls are remediable (the agent writes /proc/sys, as root).
"""

from __future__ import annotations

from autoecoops.platforms.machine_ops.model import Baseline, Check, Control

BUILTIN_ID = "linux-hardening"


def _sysctl(
    id: str,
    key: str,
    value: str,
    title: str,
    tags: tuple[str, ...],
    impact: float = 0.5,
    *,
    operator: str = "",
    rationale: str = "",
) -> Control:
    return Control(
        id=id,
        title=title,
        impact=impact,
        tags=tags,
        rationale=rationale or title,
        remediation=f"Set `{key} = {value}` in /etc/sysctl.d/60-hardening.conf and run `sysctl --system`.",
        check=Check("sysctl", key, value, operator),
        remediable=operator == "",
    )


def _mode(
    id: str,
    path: str,
    mode: str,
    tags: tuple[str, ...],
    *,
    missing_ok: bool = False,
    impact: float = 0.7,
) -> Control:
    return Control(
        id=id,
        title=f"{path} is mode {mode} or more restrictive",
        impact=impact,
        tags=tags,
        rationale=f"{path} holds account or service configuration that others must not change or read.",
        remediation=f"chmod {mode} {path}",
        check=Check("file_mode", path, mode, pass_if_missing=missing_ok),
    )


def _owner(
    id: str, path: str, owner: str, tags: tuple[str, ...], *, pattern: bool = False
) -> Control:
    return Control(
        id=id,
        title=f"{path} is owned by {owner.strip('^$')}",
        impact=0.7,
        tags=tags,
        rationale=f"Only root may own {path}.",
        remediation=f"chown {owner.strip('^$').split('|')[0].replace('(', '')} {path}",
        check=Check("file_owner", path, owner, "matches" if pattern else ""),
    )


def _absent(id: str, package: str, tags: tuple[str, ...], why: str) -> Control:
    return Control(
        id=id,
        title=f"{package} is not installed",
        impact=0.5,
        tags=tags,
        rationale=why,
        remediation=f"apt purge {package}",
        check=Check("package_absent", package),
    )


def _service_off(id: str, unit: str, tags: tuple[str, ...], why: str) -> Control:
    return Control(
        id=id,
        title=f"{unit} is not enabled",
        impact=0.5,
        tags=tags,
        rationale=why,
        remediation=f"systemctl --now disable {unit}",
        check=Check("service_enabled", unit, "false"),
    )


def _module_off(id: str, module: str, tags: tuple[str, ...]) -> Control:
    return Control(
        id=id,
        title=f"Mounting of {module} filesystems is disabled",
        impact=0.3,
        tags=tags,
        rationale=f"Removing support for unneeded filesystem types ({module}) reduces the local attack surface.",
        remediation=f"echo 'install {module} /bin/false' > /etc/modprobe.d/{module}.conf; rmmod {module}",
        check=Check("kernel_module_disabled", module, "true"),
    )


def _mount(id: str, point: str, option: str, tags: tuple[str, ...]) -> Control:
    return Control(
        id=id,
        title=f"{option} option set on {point}",
        impact=0.5,
        tags=tags,
        rationale=f"{option} on {point} keeps users from creating device files, set-uid programs or executables there.",
        remediation=f"Mount {point} as a separate file system with {option} (fstab or a systemd tmp.mount override).",
        check=Check("mount_option", point, option),
    )


def builtin_controls() -> list[Control]:
    """The built-in profile's controls, in benchmark order."""
    s = _sysctl
    return [
        s(
            "sysctl-01",
            "net.ipv4.ip_forward",
            "0",
            "IPv4 forwarding is disabled",
            ("cis:3.1.1", "devsec:sysctl-01", "level1"),
            0.7,
        ),
        s(
            "sysctl-02",
            "net.ipv4.conf.all.send_redirects",
            "0",
            "Packet redirect sending is disabled (all)",
            ("cis:3.1.2", "devsec:sysctl-18", "level1"),
        ),
        s(
            "sysctl-03",
            "net.ipv4.conf.default.send_redirects",
            "0",
            "Packet redirect sending is disabled (default)",
            ("cis:3.1.2", "devsec:sysctl-18", "level1"),
        ),
        s(
            "sysctl-04",
            "net.ipv4.conf.all.accept_source_route",
            "0",
            "Source-routed packets are not accepted (all)",
            ("cis:3.2.1", "devsec:sysctl-04", "level1"),
        ),
        s(
            "sysctl-05",
            "net.ipv4.conf.default.accept_source_route",
            "0",
            "Source-routed packets are not accepted (default)",
            ("cis:3.2.1", "devsec:sysctl-04", "level1"),
        ),
        s(
            "sysctl-06",
            "net.ipv4.conf.all.accept_redirects",
            "0",
            "ICMP redirects are not accepted (all)",
            ("cis:3.2.2", "devsec:sysctl-05", "level1"),
        ),
        s(
            "sysctl-07",
            "net.ipv4.conf.default.accept_redirects",
            "0",
            "ICMP redirects are not accepted (default)",
            ("cis:3.2.2", "devsec:sysctl-05", "level1"),
        ),
        s(
            "sysctl-08",
            "net.ipv4.conf.all.secure_redirects",
            "0",
            "Secure ICMP redirects are not accepted",
            ("cis:3.2.3", "devsec:sysctl-06", "level1"),
        ),
        s(
            "sysctl-09",
            "net.ipv4.conf.all.log_martians",
            "1",
            "Suspicious packets are logged",
            ("cis:3.2.4", "devsec:sysctl-07", "level1"),
            0.3,
        ),
        s(
            "sysctl-10",
            "net.ipv4.icmp_echo_ignore_broadcasts",
            "1",
            "Broadcast ICMP requests are ignored",
            ("cis:3.2.5", "devsec:sysctl-08", "level1"),
        ),
        s(
            "sysctl-11",
            "net.ipv4.icmp_ignore_bogus_error_responses",
            "1",
            "Bogus ICMP responses are ignored",
            ("cis:3.2.6", "devsec:sysctl-09", "level1"),
            0.3,
        ),
        s(
            "sysctl-12",
            "net.ipv4.conf.all.rp_filter",
            "1",
            "Reverse path filtering is enabled",
            ("cis:3.2.7", "devsec:sysctl-02", "level1"),
        ),
        s(
            "sysctl-13",
            "net.ipv4.tcp_syncookies",
            "1",
            "TCP SYN cookies are enabled",
            ("cis:3.2.8", "devsec:sysctl-10", "level1"),
        ),
        s(
            "sysctl-14",
            "net.ipv6.conf.all.accept_ra",
            "0",
            "IPv6 router advertisements are not accepted",
            ("cis:3.2.9", "devsec:sysctl-19", "level1"),
        ),
        s(
            "sysctl-15",
            "net.ipv6.conf.all.accept_redirects",
            "0",
            "IPv6 redirects are not accepted",
            ("cis:3.2.2", "devsec:sysctl-20", "level1"),
        ),
        s(
            "sysctl-16",
            "kernel.randomize_va_space",
            "2",
            "Address space layout randomization is enabled",
            ("cis:1.5.3", "devsec:sysctl-31b", "level1"),
            0.7,
        ),
        s(
            "sysctl-17",
            "fs.suid_dumpable",
            "0",
            "Core dumps of set-uid programs are restricted",
            ("cis:1.5.1", "devsec:sysctl-31a", "level1"),
        ),
        s(
            "sysctl-18",
            "kernel.dmesg_restrict",
            "1",
            "Kernel logs are readable by root only",
            ("devsec:sysctl-34",),
            0.3,
        ),
        s(
            "sysctl-19",
            "kernel.kptr_restrict",
            "^[12]$",
            "Kernel pointers are hidden from unprivileged users",
            ("devsec:sysctl-35",),
            0.3,
            operator="matches",
        ),
        s(
            "sysctl-20",
            "fs.protected_hardlinks",
            "1",
            "Hard links to files of other users are restricted",
            ("devsec:sysctl-32",),
            0.5,
        ),
        s(
            "sysctl-21",
            "fs.protected_symlinks",
            "1",
            "Following symlinks in sticky directories is restricted",
            ("devsec:sysctl-33",),
            0.5,
        ),
        s(
            "sysctl-22",
            "kernel.yama.ptrace_scope",
            "^[123]$",
            "ptrace is restricted (Yama)",
            ("cis:1.5.2", "level1"),
            0.5,
            operator="matches",
        ),
        _mode("file-01", "/etc/passwd", "0644", ("cis:7.1.1", "devsec:os-02", "level1")),
        _owner("file-02", "/etc/passwd", "root:root", ("cis:7.1.1", "devsec:os-02", "level1")),
        _mode(
            "file-03", "/etc/shadow", "0640", ("cis:7.1.5", "devsec:os-03", "level1"), impact=1.0
        ),
        _owner(
            "file-04",
            "/etc/shadow",
            "^root:(root|shadow)$",
            ("cis:7.1.5", "devsec:os-03", "level1"),
            pattern=True,
        ),
        _mode("file-05", "/etc/group", "0644", ("cis:7.1.3", "level1")),
        _mode("file-06", "/etc/gshadow", "0640", ("cis:7.1.7", "level1"), missing_ok=True),
        _mode(
            "file-07",
            "/etc/ssh/sshd_config",
            "0600",
            ("cis:5.1.1", "devsec:ssh-01", "level1"),
            missing_ok=True,
        ),
        _mode(
            "file-08",
            "/etc/crontab",
            "0600",
            ("cis:2.4.1.2", "level1"),
            missing_ok=True,
            impact=0.5,
        ),
        Control(
            id="file-09",
            title="root is the only account with UID 0",
            impact=1.0,
            tags=("cis:7.2.5", "devsec:os-05", "level1"),
            rationale="Any account with UID 0 has superuser privileges.",
            remediation="Remove or renumber every account other than root with UID 0.",
            check=Check("file_content", "/etc/passwd", r"^(?!root:)[^:]*:[^:]*:0:", "not_matches"),
        ),
        Control(
            id="file-10",
            title="No account has an empty password",
            impact=1.0,
            tags=("cis:7.2.2", "level1"),
            rationale="An account with an empty password field can be logged into without one.",
            remediation="passwd -l <account> for each account listed.",
            check=Check("file_content", "/etc/shadow", r"^[^:]+::", "not_matches"),
            requires_root=True,
        ),
        Control(
            id="file-11",
            title="Password expiration is 365 days or less",
            impact=0.5,
            tags=("cis:5.4.1.1", "devsec:os-07", "level1"),
            rationale="Limiting a password's lifetime limits how long a stolen one works.",
            remediation="Set PASS_MAX_DAYS 365 (or less) in /etc/login.defs.",
            check=Check(
                "file_content",
                "/etc/login.defs",
                r"^\s*PASS_MAX_DAYS\s+([1-9]|[1-9][0-9]|[12][0-9]{2}|3[0-5][0-9]|36[0-5])\s*$",
                "matches",
            ),
        ),
        Control(
            id="ssh-01",
            title="SSH root login is disabled",
            impact=1.0,
            tags=("cis:5.1.20", "devsec:sshd-07", "level1"),
            rationale="Root logins over SSH bypass accountability of named accounts.",
            remediation="Set `PermitRootLogin no` in /etc/ssh/sshd_config.",
            check=Check(
                "file_content",
                "/etc/ssh/sshd_config",
                r"^\s*PermitRootLogin\s+no\b",
                "matches",
                True,
            ),
            requires_root=True,
        ),
        _absent(
            "pkg-01",
            "telnet",
            ("cis:2.3.4", "devsec:package-08", "level1"),
            "telnet sends credentials in clear text.",
        ),
        _absent(
            "pkg-02",
            "rsh-client",
            ("cis:2.3.2", "devsec:package-02", "level1"),
            "rsh sends credentials in clear text.",
        ),
        _absent(
            "pkg-03",
            "nis",
            ("cis:2.3.1", "devsec:package-09", "level1"),
            "NIS is an insecure directory service.",
        ),
        _absent("pkg-04", "talk", ("cis:2.3.3", "level1"), "talk is an unencrypted chat client."),
        _absent(
            "pkg-05",
            "telnetd",
            ("cis:2.2.x", "devsec:package-01", "level1"),
            "A telnet server accepts clear-text logins.",
        ),
        _absent(
            "pkg-06",
            "xinetd",
            ("cis:2.1.x", "devsec:package-03", "level1"),
            "An inetd super-server starts legacy network services.",
        ),
        _service_off(
            "svc-01",
            "avahi-daemon.service",
            ("cis:2.2.2", "level1"),
            "mDNS/DNS-SD is rarely needed on servers.",
        ),
        _service_off(
            "svc-02",
            "cups.service",
            ("cis:2.2.3", "level1"),
            "A print server is rarely needed on servers.",
        ),
        _service_off(
            "svc-03",
            "rsync.service",
            ("cis:2.2.16", "level1"),
            "rsyncd transfers data unencrypted.",
        ),
        _module_off("mod-01", "cramfs", ("cis:1.1.1.1", "devsec:os-10", "level1")),
        _module_off("mod-02", "freevxfs", ("cis:1.1.1.2", "devsec:os-10", "level1")),
        _module_off("mod-03", "hfs", ("cis:1.1.1.3", "devsec:os-10", "level1")),
        _module_off("mod-04", "udf", ("cis:1.1.1.7", "devsec:os-10", "level1")),
        Control(
            id="mod-05",
            title="The DCCP protocol module is not loaded",
            impact=0.3,
            tags=("cis:3.2.1", "level2"),
            rationale="Unused network protocols widen the kernel's attack surface.",
            remediation="echo 'install dccp /bin/false' > /etc/modprobe.d/dccp.conf; rmmod dccp",
            check=Check("kernel_module_loaded", "dccp", "false"),
        ),
        _mount("mnt-01", "/tmp", "nodev", ("cis:1.1.2.2", "devsec:os-12", "level1")),
        _mount("mnt-02", "/tmp", "nosuid", ("cis:1.1.2.3", "level1")),
        _mount("mnt-03", "/tmp", "noexec", ("cis:1.1.2.4", "level1")),
        _mount("mnt-04", "/dev/shm", "nodev", ("cis:1.1.2.2", "level1")),
        _mount("mnt-05", "/dev/shm", "nosuid", ("cis:1.1.2.3", "level1")),
    ]


def builtin_baseline() -> Baseline:
    """The built-in profile as a baseline applied to every node."""
    return Baseline(
        name=f"baselines/{BUILTIN_ID}",
        title="Linux hardening (CIS Debian Linux Benchmark and dev-sec linux-baseline)",
        description="Kernel hardening sysctls, permissions of account and SSH files, unwanted "
        "packages and services, unused filesystem modules, and mount options of /tmp and /dev/shm.",
        controls=builtin_controls(),
    )
