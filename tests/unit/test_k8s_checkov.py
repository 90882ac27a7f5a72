"""Checkov passes on the rendered chart, for every value set: a failed check is a
finding to fix in the chart. A check that cannot apply is skipped in the chart
itself, by a ``checkov.io/skipN: CKV_K8S_xx=<reason>`` annotation on the
resource, so every skip carries its reason; this test skips nothing.

Checkov runs for real and offline, from the venv ./dev test installs it into."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.chart import CHECKOV, VALUE_SETS, render, tool


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Checkov's JSON report on one rendered file per value set (``<value set>.yaml``)."""
    checkov = tool(CHECKOV, "checkov")
    rendered = tmp_path_factory.mktemp("chart")
    for name, values in VALUE_SETS.items():
        (rendered / f"{name}.yaml").write_text(render(values))
    # No mapping download, no telemetry: it must run offline.
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"}
    out = subprocess.run(
        [
            checkov,
            "--directory",
            str(rendered),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=rendered,
    )
    # Exit 1 means failed checks: the report says which, and the test below shows them.
    assert out.returncode in (0, 1), out.stderr[-2000:]
    doc = json.loads(out.stdout)
    (kubernetes,) = doc if isinstance(doc, list) else [doc]
    assert kubernetes["check_type"] == "kubernetes"
    yield kubernetes


def _where(check: dict[str, Any]) -> str:
    return f"{Path(check['file_path']).stem}: {check['resource']} {check['check_id']}"


def test_checkov_finds_nothing_in_the_chart(report: dict[str, Any]) -> None:
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    # Every value set was read: one report cannot pass by checking nothing.
    checked = {Path(c["file_path"]).stem for c in report["results"]["passed_checks"]}
    assert checked == set(VALUE_SETS)
    failed = [f"{_where(c)} ({c['check_name']})" for c in report["results"]["failed_checks"]]
    assert failed == []


def test_every_skip_is_an_annotation_with_its_reason(report: dict[str, Any]) -> None:
    skipped = report["results"]["skipped_checks"]
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason.split()) >= 8, f"{_where(check)}: skipped without a reason"


def test_an_image_pinned_by_digest_needs_no_skip_and_a_tag_is_always_pulled(
    report: dict[str, Any],
) -> None:
    def verdicts(check_id: str, key: str) -> set[str]:
        return {
            Path(c["file_path"]).stem
            for c in report["results"][key]
            if c["check_id"] == check_id and c["resource"].startswith("Deployment.")
        }

    # all-features pins the image by digest: CKV_K8S_43 runs there, and passes.
    assert verdicts("CKV_K8S_43", "passed_checks") == {"all-features"}
    assert "all-features" not in verdicts("CKV_K8S_43", "skipped_checks")
    # A tag can move, so it is pulled Always; a digest cannot, so IfNotPresent is enough.
    assert verdicts("CKV_K8S_15", "passed_checks") == set(VALUE_SETS)
    assert not verdicts("CKV_K8S_15", "skipped_checks")
