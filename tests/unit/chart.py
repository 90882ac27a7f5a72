"""The Helm chart in k8s/ as its tests render it: the helm binary ./dev installs,
the value sets every check runs over, and the tools that check the result."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "helm" / "autoecoops"
HELM = ROOT / ".build" / "tools" / "helm"
CHECKOV = ROOT / ".build" / "tools" / "checkov-venv" / "bin" / "checkov"

#: The value sets the chart is checked with: its defaults, every optional
#: feature on at once (ci/all-features-values.yaml: image digest, Redis
#: Cluster seeds over TLS, more replicas, autoscaling, lease settings), and
#: autoscaling off (the Deployments then carry their own replica counts).
VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "all-features": ["-f", str(CHART / "ci" / "all-features-values.yaml")],
    "no-autoscaling": ["--set", "autoscaling.enabled=false"],
}


def tool(installed: Path, name: str) -> str:
    """The path of ``name``: the copy ./dev installs, else one on PATH.

    Missing, the test skips, except under ./dev test
    (AUTOECOOPS_REQUIRE_CHART_TOOLS=1), which installs both and must never skip.
    """
    found = str(installed) if installed.exists() else shutil.which(name)
    if found is None:
        why = f"{name} is not installed; ./dev test installs it into .build/tools"
        if os.environ.get("AUTOECOOPS_REQUIRE_CHART_TOOLS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return found


def kube_floor() -> str:
    """The oldest Kubernetes version the chart supports: the ``kubeVersion`` of Chart.yaml."""
    spec = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(?:-0)?", spec.strip())
    assert match, f"Chart.yaml kubeVersion {spec!r}: expected '>=X.Y.Z-0'"
    return match.group(1)


def render(values: list[str], kube_version: str = "1.30") -> str:
    """``helm template`` of the chart with ``values`` (helm arguments) for ``kube_version``."""
    return subprocess.run(
        [
            tool(HELM, "helm"),
            "template",
            "autoecoops",
            str(CHART),
            "--kube-version",
            f"{kube_version}.0" if kube_version.count(".") == 1 else kube_version,
            *values,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``text``."""
    return [d for d in yaml.safe_load_all(text) if d]
