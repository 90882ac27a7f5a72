"""Inventory: osquery-named tables of facts, their changes, and fleet search.

``collect`` reads this machine with psutil, /proc and /sys (the agent runs
it). Tables are lists of rows of string columns, named as osquery names
them, so a query written for osquery reads the same here. ``diff`` turns two
snapshots into the changed tables (what an agent sends) and a readable
change record (what the history keeps). ``parse_filter`` / ``matches``
implement SearchNodes' filters.
"""

from __future__ import annotations

import os
import platform
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument
from autoecoops.platforms.machine_ops.versions import compare

Row = dict[str, str]
Tables = dict[str, list[Row]]

#: The columns that identify a row of each table (for diffs and history).
KEYS: Mapping[str, tuple[str, ...]] = {
    "system_info": ("hostname",),
    "os_version": ("name",),
    "kernel_info": ("version",),
    "cpu_info": ("device_id",),
    "memory_info": ("memory_total",),
    "block_devices": ("name",),
    "mounts": ("path",),
    "interface_addresses": ("interface", "address"),
    "interface_details": ("interface",),
    "deb_packages": ("name",),
    "rpm_packages": ("name",),
    "listening_ports": ("protocol", "address", "port"),
    "gpu_info": ("pci_slot",),
}


def _read(path: str | Path, default: str = "") -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return default


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in _read("/etc/os-release").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v.strip().strip('"')
    return out


def _system_info() -> list[Row]:
    dmi = Path("/sys/class/dmi/id")
    return [
        {
            "hostname": socket.gethostname(),
            "uuid": _read(dmi / "product_uuid") or _read("/etc/machine-id"),
            "hardware_vendor": _read(dmi / "sys_vendor"),
            "hardware_model": _read(dmi / "product_name"),
            "hardware_serial": _read(dmi / "product_serial"),
            "cpu_type": platform.machine(),
            "cpu_brand": _cpu_brand(),
            "cpu_physical_cores": str(_psutil().cpu_count(logical=False) or 0),
            "cpu_logical_cores": str(_psutil().cpu_count(logical=True) or 0),
            "physical_memory": str(_psutil().virtual_memory().total),
        }
    ]


def _psutil() -> Any:
    import psutil

    return psutil


def _cpu_brand() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _os_version() -> list[Row]:
    rel = _os_release()
    version = rel.get("VERSION_ID", "")
    parts = [*version.split("."), "", ""][:2]
    return [
        {
            "name": rel.get("ID", platform.system().lower()),
            "version": version,
            "major": parts[0],
            "minor": parts[1],
            "codename": rel.get("VERSION_CODENAME", ""),
            "platform": rel.get("ID", ""),
            "platform_like": rel.get("ID_LIKE", ""),
            "pretty_name": rel.get("PRETTY_NAME", ""),
            "arch": platform.machine(),
        }
    ]


def _kernel_info() -> list[Row]:
    u = os.uname()
    return [
        {
            "version": u.release,
            "build": u.version,
            "arguments": _read("/proc/cmdline"),
            "arch": u.machine,
        }
    ]


def _cpu_info() -> list[Row]:
    ps = _psutil()
    freq = ps.cpu_freq()
    return [
        {
            "device_id": "0",
            "model": _cpu_brand(),
            "number_of_cores": str(ps.cpu_count(logical=False) or 0),
            "logical_processors": str(ps.cpu_count(logical=True) or 0),
            "max_clock_speed": str(int(freq.max)) if freq and freq.max else "",
        }
    ]


def _memory_info() -> list[Row]:
    ps = _psutil()
    vm, sw = ps.virtual_memory(), ps.swap_memory()
    return [
        {
            "memory_total": str(vm.total),
            "memory_available": str(vm.available // (64 << 20) * (64 << 20)),
            "swap_total": str(sw.total),
        }
    ]


def _block_devices() -> list[Row]:
    rows = []
    for dev in sorted(Path("/sys/block").glob("*")) if Path("/sys/block").is_dir() else []:
        sectors = _read(dev / "size", "0")
        rows.append(
            {
                "name": f"/dev/{dev.name}",
                "model": _read(dev / "device" / "model"),
                "vendor": _read(dev / "device" / "vendor"),
                "size": str(int(sectors or 0) * 512),
                "block_size": _read(dev / "queue" / "logical_block_size", "512"),
                "type": "rotational"
                if _read(dev / "queue" / "rotational") == "1"
                else "non-rotational",
            }
        )
    return rows


def _mounts() -> list[Row]:
    rows = []
    for p in _psutil().disk_partitions(all=False):
        rows.append({"path": p.mountpoint, "device": p.device, "type": p.fstype, "flags": p.opts})
    return rows


def _interfaces() -> tuple[list[Row], list[Row]]:
    ps = _psutil()
    addrs, details = [], []
    stats = ps.net_if_stats()
    for name, entries in sorted(ps.net_if_addrs().items()):
        mac = ""
        for a in entries:
            if a.family == socket.AF_INET or a.family == socket.AF_INET6:
                addrs.append(
                    {"interface": name, "address": a.address.split("%")[0], "mask": a.netmask or ""}
                )
            elif a.family == getattr(ps, "AF_LINK", 17):
                mac = a.address
        st = stats.get(name)
        details.append(
            {
                "interface": name,
                "mac": mac,
                "mtu": str(st.mtu) if st else "",
                "link_speed": str(st.speed) if st else "",
                "flags": "up" if st and st.isup else "down",
            }
        )
    return addrs, details


def _packages() -> tuple[str, list[Row]]:
    from autoecoops.platforms.machine_ops.checks import Host

    host = Host()
    try:
        from autoecoops.platforms.machine_ops.checks import read_packages

        pkgs = read_packages(host)
    except Exception:  # no package database: no package table
        return "", []
    table = "deb_packages" if host.dpkg_status.exists() else "rpm_packages"
    return table, [{"name": n, "version": v} for n, v in sorted(pkgs.items())]


def _listening_ports() -> list[Row]:
    """Sockets in LISTEN (TCP) or bound (UDP) from /proc/net, as a non-root user can see them."""
    rows: dict[tuple[str, str, str], Row] = {}
    for proto, path, state in (
        ("tcp", "/proc/net/tcp", "0A"),
        ("tcp", "/proc/net/tcp6", "0A"),
        ("udp", "/proc/net/udp", "07"),
        ("udp", "/proc/net/udp6", "07"),
    ):
        for line in _read(path).splitlines()[1:]:
            parts = line.split()
            if len(parts) < 4 or parts[3] != state:
                continue
            addr_hex, port_hex = parts[1].split(":")
            address = _decode_addr(addr_hex)
            port = str(int(port_hex, 16))
            rows[(proto, address, port)] = {
                "protocol": proto,
                "address": address,
                "port": port,
                "family": "6" if "6" in path else "4",
            }
    return [rows[k] for k in sorted(rows)]


def _decode_addr(h: str) -> str:
    raw = bytes.fromhex(h)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


#: Where distributions keep the PCI id database (Debian's pciutils, hwdata).
PCI_IDS = (
    Path("/usr/share/misc/pci.ids"),
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/pci.ids"),
)
_VENDOR_LINE = re.compile(rb"\n[0-9a-fA-F]{4}  ")


class PciNames:
    """Vendor and device names from a pci.ids file, resolved lazily.

    Nothing is read until a name is asked for (most nodes have no GPU); then
    the file is read once and only the asked vendor's block is scanned, with
    bytes.find rather than a parse of its 40,000 lines.
    """

    def __init__(self, paths: tuple[Path, ...] = PCI_IDS) -> None:
        self._paths = paths
        self._data: bytes | None = None

    def _db(self) -> bytes:
        if self._data is None:
            self._data = b""
            for path in self._paths:
                try:
                    # A leading newline lets every vendor line be found as "\n<id>  ".
                    self._data = b"\n" + path.read_bytes()
                    break
                except OSError:
                    continue
        return self._data

    def names(self, vendor_id: str, device_id: str) -> tuple[str, str]:
        """(vendor name, device name); "" for each one the database lacks."""
        vendor_id, device_id = _pci_id(vendor_id), _pci_id(device_id)
        data = self._db()
        if not data or len(vendor_id) != 4:
            return "", ""
        start = data.find(b"\n" + vendor_id.encode() + b"  ")
        if start < 0:
            return "", ""
        line_end = data.find(b"\n", start + 1)
        vendor = data[start + 7 : line_end if line_end >= 0 else None].decode(errors="replace")
        nxt = _VENDOR_LINE.search(data, start + 1)
        # Device lines are one tab in; subsystem lines (two tabs) never match "\n\t<id>  ".
        block_end = nxt.start() if nxt else len(data)
        at = data.find(b"\n\t" + device_id.encode() + b"  ", start, block_end)
        if at < 0 or len(device_id) != 4:
            return vendor.strip(), ""
        end = data.find(b"\n", at + 1)
        return vendor.strip(), data[at + 8 : end if end >= 0 else None].decode(
            errors="replace"
        ).strip()


def _pci_id(raw: str) -> str:
    """'0x10DE' -> '10de' (sysfs writes ids with 0x; pci.ids without, lower case)."""
    raw = raw.strip().lower()
    return raw[2:] if raw.startswith("0x") else raw


def _gpus(base: Path = Path("/sys/bus/pci/devices"), names: PciNames | None = None) -> list[Row]:
    """Display/3D controllers on the PCI bus (class 0x03xxxx), from /sys; columns as
    osquery's pci_devices: vendor and model names from pci.ids when it has them,
    the ids otherwise, and always vendor_id and model_id."""
    rows = []
    names = names or PciNames()
    for dev in sorted(base.glob("*")) if base.is_dir() else []:
        if not _read(dev / "class").startswith("0x03"):
            continue
        vendor_id, model_id = _read(dev / "vendor"), _read(dev / "device")
        vendor, model = names.names(vendor_id, model_id)
        rows.append(
            {
                "pci_slot": dev.name,
                "vendor": vendor or vendor_id,
                "vendor_id": vendor_id,
                "model": model or model_id,
                "model_id": model_id,
                "driver": Path(os.readlink(dev / "driver")).name
                if (dev / "driver").exists()
                else "",
            }
        )
    return rows


def collect() -> Tables:
    """Every table, read from this machine now."""
    addrs, details = _interfaces()
    tables: Tables = {
        "system_info": _system_info(),
        "os_version": _os_version(),
        "kernel_info": _kernel_info(),
        "cpu_info": _cpu_info(),
        "memory_info": _memory_info(),
        "block_devices": _block_devices(),
        "mounts": _mounts(),
        "interface_addresses": addrs,
        "interface_details": details,
        "listening_ports": _listening_ports(),
    }
    name, pkgs = _packages()
    if name:
        tables[name] = pkgs
    gpus = _gpus()
    if gpus:
        tables["gpu_info"] = gpus
    return tables


def _key(table: str, row: Row) -> str:
    return "/".join(row.get(c, "") for c in KEYS.get(table, tuple(sorted(row))))


@dataclass(frozen=True, slots=True)
class Change:
    """What changed in one table."""

    table: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()


def diff(old: Tables, new: Tables) -> tuple[Tables, list[str]]:
    """The tables of ``new`` that differ from ``old`` (in full) and the tables removed."""
    changed = {t: rows for t, rows in new.items() if old.get(t) != rows}
    removed = sorted(set(old) - set(new))
    return changed, removed


def changes(old: Tables, changed: Tables, removed: list[str]) -> list[Change]:
    """A readable record of a delta against the previous snapshot."""
    out = []
    for table, rows in sorted(changed.items()):
        before = {_key(table, r): r for r in old.get(table, [])}
        after = {_key(table, r): r for r in rows}
        mod = []
        for k in sorted(set(before) & set(after)):
            if before[k] != after[k]:
                cols = [c for c in after[k] if before[k].get(c) != after[k][c]]
                mod.append(
                    f"{k}: "
                    + ", ".join(f"{c} {before[k].get(c, '')} -> {after[k][c]}" for c in cols)
                )
        out.append(
            Change(
                table,
                tuple(sorted(set(after) - set(before))),
                tuple(sorted(set(before) - set(after))),
                tuple(mod),
            )
        )
    for table in removed:
        out.append(Change(table, (), tuple(sorted(_key(table, r) for r in old.get(table, []))), ()))
    return [c for c in out if c.added or c.removed or c.changed]


# -- fleet search --------------------------------------------------------------

_FACT = re.compile(
    r"^\s*(os\.version|os\.name|kernel\.version|hostname|cpu\.logical_cores|memory\.total)\s*(<=|>=|!=|=|<|>)\s*(\S+)\s*$"
)
_PKG = re.compile(r"^\s*package:([A-Za-z0-9.+_-]+)(?:\s+version\s*(<=|>=|!=|=|<|>)\s*(\S+))?\s*$")


@dataclass(frozen=True, slots=True)
class Term:
    """One filter term: a fact compared to a value, or a package (with a version)."""

    subject: str  # "os.version", ... or "package:<name>"
    op: str = ""
    value: str = ""


def parse_filter(text: str, field: str = "filter") -> tuple[Term, ...]:
    """The terms of ``a AND b AND ...``; INVALID_ARGUMENT naming ``field`` when malformed."""
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip(), flags=re.IGNORECASE) if text.strip() else []:
        if m := _FACT.match(part):
            terms.append(Term(m.group(1), m.group(2), m.group(3)))
        elif m := _PKG.match(part):
            terms.append(Term(f"package:{m.group(1)}", m.group(2) or "", m.group(3) or ""))
        else:
            raise InvalidArgument(
                f"{field}: cannot parse {part!r}",
                reason="INVALID_FILTER",
                field_violations=[
                    FieldViolation(
                        field,
                        f"bad term {part!r}; e.g. 'os.version < 12' or 'package:openssl version < 3.0.13'",
                    )
                ],
            )
    return tuple(terms)


def _facts(tables: Tables) -> dict[str, str]:
    os_row = (tables.get("os_version") or [{}])[0]
    sys_row = (tables.get("system_info") or [{}])[0]
    return {
        "os.version": os_row.get("version", ""),
        "os.name": os_row.get("name", ""),
        "kernel.version": (tables.get("kernel_info") or [{}])[0].get("version", ""),
        "hostname": sys_row.get("hostname", ""),
        "cpu.logical_cores": sys_row.get("cpu_logical_cores", ""),
        "memory.total": (tables.get("memory_info") or [{}])[0].get("memory_total", ""),
    }


def _cmp(observed: str, op: str, value: str) -> bool:
    c = compare(observed, value)
    return {"<": c < 0, "<=": c <= 0, ">": c > 0, ">=": c >= 0, "=": c == 0, "!=": c != 0}[op]


def matches(terms: tuple[Term, ...], tables: Tables) -> bool:
    """Whether a node's inventory satisfies every term (a node with no inventory matches none)."""
    if terms and not tables:
        return False
    facts = _facts(tables)
    packages = {
        r["name"]: r.get("version", "")
        for t in ("deb_packages", "rpm_packages")
        for r in tables.get(t, [])
    }
    for term in terms:
        if term.subject.startswith("package:"):
            version = packages.get(term.subject[8:])
            if version is None or (term.op and not _cmp(version, term.op, term.value)):
                return False
        else:
            observed = facts.get(term.subject, "")
            if not observed or not _cmp(observed, term.op, term.value):
                return False
    return True
