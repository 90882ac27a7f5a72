"""The fixed corpus IAOps is compared with Checkov on, and the comparison.

The corpus: this repository's Helm chart rendered by helm, plus manifests
written here with known faults. Checkov runs offline from its own venv
(``.build/tools/checkov-venv``, installed by ``./dev test``); only the checks
both tools have are compared, per (resource, Checkov check): both fail,
both pass, or a disagreement, each of which docs/iaops.md explains.

``python -m tests.integration.iaops.checkov_corpus`` prints the agreement
table docs/iaops.md shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoecoops.platforms.iaops.documents import collect
from autoecoops.platforms.iaops.rules import RULES
from autoecoops.platforms.iaops.validation import Validator

ROOT = Path(__file__).resolve().parents[3]
CHECKOV = ROOT / ".build" / "tools" / "checkov-venv" / "bin" / "checkov"
HELM = ROOT / ".build" / "tools" / "helm"
CHART = ROOT / "k8s" / "helm" / "autoecoops"

#: Checkov check -> our rule, for the checks both tools have.
MAPPING: dict[str, str] = {
    ck: rule.id for rule in RULES.values() if rule.id.startswith("AEO-K8S") for ck in rule.checkov
}


def _container(name: str, **over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": "ghcr.io/example/app:1.0@sha256:" + "b" * 64,
        "imagePullPolicy": "Always",
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    c.update(over)
    return c


def _deploy(name: str, pod: dict[str, Any], kind: str = "Deployment") -> dict[str, Any]:
    spec = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        **pod,
    }
    template = {"metadata": {"labels": {"app": name}}, "spec": spec}
    body: dict[str, Any]
    if kind == "Pod":
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "faults"},
            "spec": spec,
        }
    if kind == "CronJob":
        body = {"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": template}}}
        return {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": name, "namespace": "faults"},
            "spec": body,
        }
    body = {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "faults"},
        "spec": body,
    }


def fault_manifests() -> dict[str, list[dict[str, Any]]]:
    """Manifests with known faults, one concern per file."""
    return {
        "good.yaml": [_deploy("good", {"containers": [_container("app")]})],
        "host.yaml": [
            _deploy(
                "host",
                {
                    "hostNetwork": True,
                    "hostPID": True,
                    "hostIPC": True,
                    "containers": [
                        _container(
                            "app",
                            ports=[{"containerPort": 80, "hostPort": 80}],
                            securityContext={
                                **_container("x")["securityContext"],
                                "privileged": True,
                            },
                        )
                    ],
                },
            )
        ],
        "bare-pod.yaml": [
            _deploy(
                "bare",
                {"securityContext": {}, "containers": [{"name": "app", "image": "nginx"}]},
                "Pod",
            )
        ],
        "caps.yaml": [
            _deploy(
                "caps",
                {
                    "securityContext": {},
                    "containers": [
                        _container(
                            "app",
                            securityContext={
                                "allowPrivilegeEscalation": True,
                                "readOnlyRootFilesystem": False,
                                "capabilities": {"add": ["SYS_ADMIN", "NET_ADMIN"]},
                            },
                        )
                    ],
                },
            )
        ],
        "latest.yaml": [
            _deploy(
                "latest",
                {
                    "containers": [
                        _container(
                            "app", image="nginx:latest", resources={"requests": {"cpu": "10m"}}
                        ),
                    ]
                },
                "CronJob",
            )
        ],
        "netadmin.yaml": [
            _deploy(
                "netadmin",
                {
                    "containers": [
                        _container(
                            "app",
                            securityContext={
                                **_container("x")["securityContext"],
                                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
                            },
                        )
                    ]
                },
                "StatefulSet",
            )
        ],
    }


def write_corpus(directory: Path) -> Path:
    """Render the chart and write the fault manifests into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    helm = str(HELM) if HELM.exists() else shutil.which("helm")
    if helm is None:
        raise FileNotFoundError("helm is not installed; ./dev test installs it into .build/tools")
    chart = subprocess.run(
        [helm, "template", "autoecoops", str(CHART), "--kube-version", "1.30.0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    (directory / "chart.yaml").write_text(chart)
    for name, docs in fault_manifests().items():
        (directory / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


def run_checkov(directory: Path) -> dict[tuple[str, str], bool]:
    """(resource, check id) -> passed, from Checkov run offline on ``directory``."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"}
    out = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(directory),
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--compact",
            "--skip-download",
            "--check",
            ",".join(sorted(MAPPING)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=directory,
    )
    doc = json.loads(out.stdout)
    reports = doc if isinstance(doc, list) else [doc]
    verdicts: dict[tuple[str, str], bool] = {}
    for report in reports:
        for key, passed in (("passed_checks", True), ("failed_checks", False)):
            for c in report["results"].get(key, []):
                verdicts[(c["resource"], c["check_id"])] = passed
    return verdicts


def run_ours(directory: Path) -> dict[tuple[str, str], bool]:
    """(resource, check id) -> passed, for the same keys, from IAOps's rules."""
    report = Validator().validate(collect([directory]))
    fired: dict[str, set[str]] = defaultdict(set)
    for f in report.findings:
        ns = f.resource.namespace or "default"
        fired[f"{f.resource.kind}.{ns}.{f.resource.name}"].add(f.rule_id)
    return {"__fired__": fired}  # type: ignore[dict-item]


@dataclass
class Agreement:
    """The comparison over the checks both tools have."""

    both_fail: int = 0
    both_pass: int = 0
    disagreements: list[tuple[str, str, bool]] = field(default_factory=list)
    per_check: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def total(self) -> int:
        """Compared (resource, check) pairs."""
        return self.both_fail + self.both_pass + len(self.disagreements)

    @property
    def rate(self) -> float:
        """The share of pairs both tools agree on."""
        return (self.both_fail + self.both_pass) / self.total if self.total else 1.0


def compare(directory: Path) -> Agreement:
    """Run both tools on ``directory`` and compare their verdicts."""
    checkov = run_checkov(directory)
    fired = run_ours(directory)["__fired__"]  # type: ignore[index]
    out = Agreement()
    for (resource, check), ck_passed in sorted(checkov.items()):
        rule = MAPPING.get(check)
        if rule is None:
            continue
        ours_passed = rule not in fired.get(resource, set())
        counts = out.per_check[check]
        if ours_passed == ck_passed:
            counts[0] += 1
            if ck_passed:
                out.both_pass += 1
            else:
                out.both_fail += 1
        else:
            counts[1] += 1
            out.disagreements.append((resource, check, ck_passed))
    return out


def table(agreement: Agreement) -> str:
    """The agreement as a Markdown table."""
    lines = ["| Checkov check | IAOps rule | agree | disagree |", "|---|---|---|---|"]
    for check in sorted(agreement.per_check, key=lambda c: int(c.rsplit("_", 1)[1])):
        agree, disagree = agreement.per_check[check]
        lines.append(f"| {check} | {MAPPING[check]} | {agree} | {disagree} |")
    lines.append(
        f"\n{agreement.total} (resource, check) pairs: {agreement.both_fail} both fail, "
        f"{agreement.both_pass} both pass, {len(agreement.disagreements)} disagree "
        f"({agreement.rate:.1%} agreement)."
    )
    for resource, check, ck_passed in agreement.disagreements:
        lines.append(
            f"- {resource} {check}: Checkov {'passes' if ck_passed else 'fails'}, IAOps {'fails' if ck_passed else 'passes'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(table(compare(write_corpus(Path(tmp)))))
