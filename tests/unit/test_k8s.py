"""The Kubernetes manifests: the Helm chart renders, and what it renders keeps
the security model (default-deny, Pod Security restricted, hardened
containers, probes, limits) and agrees with the mesh's port table."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoecoops.kernel.mesh.config import SERVICES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "helm" / "autoecoops"
HELM = ROOT / ".build" / "tools" / "helm"
NAMESPACES = {"autoecops-core", "autoecops-autoops", "autoecops-iaops", "autoecops-machine-ops"}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    helm = str(HELM) if HELM.exists() else shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed; ./dev test installs it into .build/tools")
    out = subprocess.run(
        [helm, "template", "autoecoops", str(CHART), "--kube-version", "1.30.0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_every_namespace_enforces_pod_security_restricted(rendered: list[dict[str, Any]]) -> None:
    namespaces = of_kind(rendered, "Namespace")
    assert {n["metadata"]["name"] for n in namespaces} == NAMESPACES
    for ns in namespaces:
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_namespace_denies_by_default_and_allows_dns(rendered: list[dict[str, Any]]) -> None:
    policies = of_kind(rendered, "NetworkPolicy")
    for ns in NAMESPACES:
        mine = {
            p["metadata"]["name"]: p["spec"] for p in policies if p["metadata"]["namespace"] == ns
        }
        deny = mine["default-deny-all"]
        assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
        assert "ingress" not in deny and "egress" not in deny
        dns = mine["allow-dns-egress"]["egress"][0]
        assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}


def test_deployments_are_hardened_probed_and_bounded(rendered: list[dict[str, Any]]) -> None:
    deployments = of_kind(rendered, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {s.name for s in SERVICES} | {"gateway"}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert (
                sc["runAsNonRoot"]
                and not sc["allowPrivilegeEscalation"]
                and sc["readOnlyRootFilesystem"]
            )
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and {"cpu", "memory"} <= set(
                c["resources"]["requests"]
            )
            assert "readinessProbe" in c and "livenessProbe" in c, d["metadata"]["name"]


def test_services_match_the_port_table_and_probe_grpc_health(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind(rendered, "Deployment")}
    services = {s["metadata"]["name"]: s for s in of_kind(rendered, "Service")}
    for svc in SERVICES:
        container = deployments[svc.name]["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["serve", svc.name]
        assert container["readinessProbe"]["grpc"]["port"] == svc.port
        assert services[svc.name]["spec"]["ports"][0]["port"] == svc.port
        env = {e["name"]: e for e in container["env"]}
        assert env[f"AUTOECOOPS_{svc.env}_PORT"]["value"] == str(svc.port)
        # Every service knows where every other one lives.
        for other in SERVICES:
            assert env[f"AUTOECOOPS_{other.env}_ADDR"]["value"].endswith(f".svc:{other.port}")
        expected_ns = "autoecops-core" if svc.port < 5000 else f"autoecops-{svc.name}"
        assert deployments[svc.name]["metadata"]["namespace"] == expected_ns


def test_only_infra_manager_gets_a_kubernetes_api_token(rendered: list[dict[str, Any]]) -> None:
    for d in of_kind(rendered, "Deployment"):
        automount = d["spec"]["template"]["spec"]["automountServiceAccountToken"]
        assert automount is (d["metadata"]["name"] == "infra-manager")


def test_admission_policies_enforce() -> None:
    policies = [
        yaml.safe_load(p.read_text()) for p in sorted((ROOT / "k8s" / "policies").glob("*.yaml"))
    ]
    names = {p["metadata"]["name"] for p in policies}
    assert names == {
        "autoecoops-verify-image-signatures",
        "autoecoops-require-resource-limits",
        "autoecoops-require-probes",
    }
    for p in policies:
        assert p["kind"] == "ClusterPolicy" and p["spec"]["validationFailureAction"] == "Enforce"
        for rule in p["spec"]["rules"]:
            assert set(rule["match"]["any"][0]["resources"]["namespaces"]) == NAMESPACES


def test_argocd_deploys_the_chart_and_the_policies() -> None:
    apps = list(yaml.safe_load_all((ROOT / "k8s" / "argocd" / "applications.yaml").read_text()))
    paths = {a["spec"]["source"]["path"] for a in apps}
    assert paths == {"k8s/helm/autoecoops", "k8s/policies"}
    assert all(a["spec"]["syncPolicy"]["automated"]["selfHeal"] for a in apps)
