"""The chart runs infra-manager on the real Kubernetes backend with rights limited to what it manages."""

from __future__ import annotations

from typing import Any

import pytest

from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError
from tests.unit.test_k8s import NAMESPACES, of_kind, rendered  # noqa: F401  (the fixture)


def infra_manager_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (dep,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "infra-manager"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "infra-manager"
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_the_chart_selects_the_kubernetes_backend(rendered: list[dict[str, Any]]) -> None:  # noqa: F811
    env = infra_manager_env(rendered)
    assert env["AUTOECOOPS_INFRA_MANAGER_CLUSTER"] == "kubernetes"
    assert env["AUTOECOOPS_INFRA_MANAGER_ALLOW_LOCAL_REPOS"] == "false"
    # The settings the pod would read are valid, and say kubernetes.
    settings = InfraSettings.from_env(MeshConfig(), {**env, "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert settings.backend == "kubernetes" and not settings.allow_local_repos


def test_infra_manager_may_write_only_what_it_manages_where_it_manages_it(
    rendered: list[dict[str, Any]],  # noqa: F811
) -> None:
    roles = {r["metadata"]["name"]: r for r in of_kind(rendered, "ClusterRole")}
    read, write = roles["autoecoops-infra-manager-read"], roles["autoecoops-infra-manager-write"]
    cluster_write = roles["autoecoops-infra-manager-cluster-write"]
    for role in (read, write, cluster_write):
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] and "*" not in rule["resources"]
            assert "*" not in rule["verbs"] and "escalate" not in rule["verbs"]
            assert "secrets" not in rule["resources"]  # not unless a user adds them
    assert {v for r in read["rules"] for v in r["verbs"]} == {"get", "list", "watch"}
    assert {v for r in write["rules"] for v in r["verbs"]} == {
        "create",
        "update",
        "patch",
        "delete",
    }
    assert [r["resources"] for r in cluster_write["rules"]] == [["namespaces"]]
    # Namespaced writes are bound per namespace, never cluster-wide.
    bindings = of_kind(rendered, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == NAMESPACES
    for b in bindings:
        assert b["roleRef"]["name"] == "autoecoops-infra-manager-write"
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "infra-manager", "namespace": "autoecops-core"}
        ]
    crbs = {b["roleRef"]["name"] for b in of_kind(rendered, "ClusterRoleBinding")}
    assert "autoecoops-infra-manager-write" not in crbs
    assert crbs == {"autoecoops-infra-manager-read", "autoecoops-infra-manager-cluster-write"}


def test_the_embedded_backend_refuses_to_start_in_a_pod_unless_chosen() -> None:
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    with pytest.raises(ConfigError) as err:
        InfraSettings.from_env(MeshConfig(), pod)
    assert "AUTOECOOPS_INFRA_MANAGER_CLUSTER" in str(err.value)
    chosen = {**pod, "AUTOECOOPS_INFRA_MANAGER_CLUSTER": "embedded"}
    assert InfraSettings.from_env(MeshConfig(), chosen).backend == "embedded"
    assert InfraSettings.from_env(MeshConfig(), {}).backend == "embedded"  # a laptop
