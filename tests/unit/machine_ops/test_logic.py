"""The plain-Python logic: versions, selectors, import, scores, drift, reports, search, outbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoecoops.kernel.mesh.errors import InvalidArgument
from autoecoops.platforms.machine_ops import compliance, inventory
from autoecoops.platforms.machine_ops.buffer import Outbox
from autoecoops.platforms.machine_ops.importer import parse_controls
from autoecoops.platforms.machine_ops.model import Result
from autoecoops.platforms.machine_ops.selectors import matches, parse_selector
from autoecoops.platforms.machine_ops.versions import compare, satisfies


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        ("3.0.11-1~deb12u2", "3.0.13", -1),
        ("3.0.13-1", "3.0.13", 1),
        ("1.0~rc1", "1.0", -1),
        ("1:1.0", "2.0", 1),
        ("12", "12.0", -1),
        ("2.36-9+deb12u4", "2.36-9+deb12u10", -1),
        ("1.2.3", "1.2.3", 0),
    ],
)
def test_debian_version_order(a: str, b: str, sign: int) -> None:
    c = compare(a, b)
    assert (c > 0) - (c < 0) == sign


def test_constraints() -> None:
    assert satisfies("3.0.11", "<", "3.0.13") and not satisfies("3.0.13", "<", "3.0.13")


def test_label_selectors() -> None:
    sel = parse_selector("zone=edge,env in (prod, staging),!legacy,tier!=db,gpu")
    assert matches(sel, {"zone": "edge", "env": "prod", "gpu": "a100"})
    assert not matches(sel, {"zone": "edge", "env": "prod", "gpu": "x", "legacy": "1"})
    assert not matches(sel, {"zone": "edge", "env": "dev", "gpu": "x"})
    assert matches(parse_selector(""), {})
    with pytest.raises(InvalidArgument) as err:
        parse_selector("=edge", "baseline.node_selector")
    assert err.value.field_violations[0].field == "baseline.node_selector"


def test_inspec_style_import() -> None:
    meta, controls = parse_controls(
        """
title: Edge hardening
node_selector: zone=edge
controls:
  - id: sysctl-01
    title: IPv4 forwarding is disabled
    impact: 0.7
    tags: {cis: "3.1.1", level1: null}
    desc: no routing
    kernel_parameter: {name: net.ipv4.ip_forward, value: 0}
  - id: shadow-mode
    impact: 1.0
    file: {path: /etc/shadow, mode: 0o640}
  - id: no-telnet
    package: {name: telnet, installed: false}
  - id: tmp-nodev
    mount: {path: /tmp, option: nodev}
"""
    )
    assert meta == {"title": "Edge hardening", "node_selector": "zone=edge"}
    assert [c.check.kind for c in controls] == [
        "sysctl",
        "file_mode",
        "package_absent",
        "mount_option",
    ]
    assert controls[0].tags == ("cis:3.1.1", "level1") and controls[0].severity == "high"
    assert controls[1].check.expected == "0640" and controls[1].severity == "critical"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("- id: a\n  kernel_parameter: {name: x, value: 1}\n  impact: 2", "controls[0].impact"),
        ("- id: a\n  file: {path: rel/path, mode: '0644'}", "controls[0].check.key"),
        ("- id: a\n  title: no check", "controls[0]"),
        ("- id: a\n  command: {name: rm-rf, match: x}", "controls[0].check.key"),
        ("controls: [", "yaml"),
    ],
)
def test_import_errors_name_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_controls(text)
    assert err.value.field_violations[0].field == field


def r(cid: str, status: str, observed: str = "", sev: str = "medium") -> Result:
    return Result("baselines/b", cid, status, observed=observed, severity=sev)


def test_score_drift_and_report() -> None:
    before = [r("a", "pass", "0"), r("b", "pass", "1"), r("c", "skip")]
    after = [r("a", "fail", "1", "high"), r("b", "pass", "1"), r("c", "skip"), r("d", "error")]
    assert compliance.score(after) == 50.0 and compliance.score([r("x", "skip")]) == 100.0
    d = compliance.drift(before, after)
    assert [
        (x.control_id, x.previous_status, x.status, x.previous_observed, x.observed) for x in d
    ] == [("a", "pass", "fail", "0", "1")]
    assert compliance.max_severity(after) == "high"
    rep = compliance.policy_report("nodes/n1", after, 1.0)
    assert rep["summary"] == {"pass": 1, "fail": 1, "warn": 0, "error": 1, "skip": 1}
    assert rep["scope"] == {"apiVersion": "v1", "kind": "Node", "name": "n1"}
    assert {x["result"] for x in rep["results"]} == {"pass", "fail", "error", "skip"}


def test_inventory_diff_changes_and_search() -> None:
    old = {
        "deb_packages": [{"name": "openssl", "version": "3.0.11-1"}],
        "os_version": [{"name": "debian", "version": "11"}],
    }
    new = {
        "deb_packages": [
            {"name": "openssl", "version": "3.0.13-1"},
            {"name": "curl", "version": "7.88"},
        ],
        "os_version": [{"name": "debian", "version": "11"}],
    }
    changed, removed = inventory.diff(old, new)
    assert set(changed) == {"deb_packages"} and removed == []
    (ch,) = inventory.changes(old, changed, removed)
    assert ch.added == ("curl",) and ch.changed == ("openssl: version 3.0.11-1 -> 3.0.13-1",)
    f = inventory.parse_filter("os.version < 12 AND package:openssl version < 3.0.13")
    assert inventory.matches(f, old) and not inventory.matches(f, new)
    assert inventory.matches(inventory.parse_filter("package:curl"), new)
    assert not inventory.matches(inventory.parse_filter("package:curl"), old)
    with pytest.raises(InvalidArgument):
        inventory.parse_filter("os.version ~ 12")


def test_collect_reads_this_machine() -> None:
    import os

    t = inventory.collect()
    assert t["kernel_info"][0]["version"] == os.uname().release
    assert int(t["system_info"][0]["cpu_logical_cores"]) == os.cpu_count()


def test_outbox_bounded_durable_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", capacity=3)
    seqs = [box.append(f"m{i}".encode()) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [s for s, _ in box.pending()] == [3, 4, 5] and box.dropped == 2
    epoch = box.epoch
    box.ack(3)
    box.close()
    again = Outbox(tmp_path / "o.sqlite3", capacity=3)
    assert again.epoch == epoch and again.dropped == 2
    assert [(s, p) for s, p in again.pending()] == [(4, b"m3"), (5, b"m4")]
    assert again.append(b"m5") == 6
    again.ack_through(5)
    assert [s for s, _ in again.pending()] == [6]
