"""The Kubernetes manifests: the Helm chart renders, and what it renders keeps
the security model (default-deny, Pod Security restricted, hardened
containers, probes, limits) and agrees with the mesh's port table."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from autoecoops.kernel.mesh.config import SERVICES
from tests.unit.chart import ROOT, documents, render

NAMESPACES = {"autoecops-core", "autoecops-autoops", "autoecops-iaops", "autoecops-machine-ops"}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return documents(render([]))


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


def test_stateless_services_autoscale_on_cpu_and_keep_a_quorum(
    rendered: list[dict[str, Any]],
) -> None:
    hpas = {h["metadata"]["name"]: h for h in of_kind(rendered, "HorizontalPodAutoscaler")}
    assert set(hpas) == {s.name for s in SERVICES} - {"infra-manager"}
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] >= 2
    deployments = {d["metadata"]["name"]: d for d in of_kind(rendered, "Deployment")}
    # The autoscaler owns the count of what it scales.
    assert all("replicas" not in deployments[n]["spec"] for n in hpas)
    pdbs = {p["metadata"]["name"]: p["spec"] for p in of_kind(rendered, "PodDisruptionBudget")}
    for name in hpas:
        assert pdbs[name]["minAvailable"] == hpas[name]["spec"]["minReplicas"] // 2 + 1


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 5])
def test_a_disruption_budget_never_blocks_a_drain(replicas: int) -> None:
    """Every PodDisruptionBudget allows at least one eviction at the minimum replica
    count (a budget allowing none makes kubectl drain hang), and keeps a majority
    from three replicas up."""
    docs = documents(render(["--set", f"autoscaling.minReplicas={replicas}"]))
    pdbs = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "PodDisruptionBudget")}
    hpas = {h["metadata"]["name"]: h["spec"] for h in of_kind(docs, "HorizontalPodAutoscaler")}
    deployments = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "Deployment")}
    assert set(pdbs) == set(deployments)
    for name, pdb in pdbs.items():
        n = hpas[name]["minReplicas"] if name in hpas else deployments[name].get("replicas", 1)
        allowed = pdb["maxUnavailable"] if "maxUnavailable" in pdb else n - pdb["minAvailable"]
        assert allowed >= 1, f"{name}: {pdb} allows no eviction of {n} replicas"
        if n >= 3:
            assert pdb["minAvailable"] == n // 2 + 1, (name, pdb)


def test_redis_cluster_seeds_and_lease_settings_reach_every_service() -> None:
    docs = documents(
        render(
            [
                "--set",
                "redis.cluster.seeds={r0.redis:6379,r1.redis:6379}",
                "--set",
                "leases.ttlSeconds=30",
            ]
        )
    )
    for d in of_kind(docs, "Deployment"):
        if d["metadata"]["name"] == "gateway":
            continue
        env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["REDIS_URL"]["value"] == "redis+cluster://r0.redis:6379,r1.redis:6379"
        assert env["AUTOECOOPS_LEASE_TTL_SECONDS"]["value"] == "30"
