"""Dogfood: this repository's k8s/ validates clean with IAOps's own rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from autoecoops.platforms.iaops.documents import collect
from autoecoops.platforms.iaops.validation import Validator

ROOT = Path(__file__).resolve().parents[3]
HELM = ROOT / ".build" / "tools" / "helm"


def render(*flags: str) -> str:
    helm = str(HELM) if HELM.exists() else shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed; ./dev test installs it into .build/tools")
    return subprocess.run(
        [
            helm,
            "template",
            "autoecoops",
            str(ROOT / "k8s/helm/autoecoops"),
            "--kube-version",
            "1.30.0",
            *flags,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def test_k8s_directory_is_clean_and_the_chart_is_left_to_infra_manager() -> None:
    charts: list[str] = []
    report = Validator().validate(collect([ROOT / "k8s"], charts))
    assert report.findings == [] and report.resource_count > 0
    assert charts == [str(ROOT / "k8s/helm/autoecoops")]


def test_the_rendered_chart_fails_nothing_and_is_clean_with_a_digest() -> None:
    default = Validator().validate([("chart.yaml", render())])
    assert default.failures == 0
    # The only warnings: images by tag; the release sets image.digest (docs/iaops.md).
    assert {f.rule_id for f in default.findings} == {"AEO-K8S-037"}
    pinned = Validator().validate(
        [("chart.yaml", render("--set", "image.digest=sha256:" + "a" * 64))]
    )
    assert pinned.findings == [] and pinned.resource_count == default.resource_count
