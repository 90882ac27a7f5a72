"""Every manifest in k8s/ is valid Kubernetes: the rendered chart (each value set)
and any plain manifest beside it, checked offline by kubernetes-validate against
the OpenAPI schemas of the Kubernetes versions the chart supports, strictly
(a field the API does not know is an error, as the API server's strict field
validation makes it)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.unit.chart import CHART, ROOT, VALUE_SETS, documents, kube_floor, render

#: The chart's floor (Chart.yaml's kubeVersion, 1.27 today) and the newest
#: version the pinned kubernetes-validate ships schemas for (1.37 with 1.37.0).
#: An API the floor lacks, or one a newer release removed, fails one of them.
KUBE_VERSIONS = (kube_floor(), kubernetes_validate.latest_version().rsplit(".", 1)[0])

#: API groups of custom resources: their schemas come with their operators,
#: not with Kubernetes, so kubernetes-validate has none. Argo CD's Application
#: and AppProject (k8s/argocd) and Kyverno's ClusterPolicy (k8s/policies) are
#: checked by tests/unit/test_k8s.py instead.
CRD_GROUPS = {"argoproj.io": {"Application", "AppProject"}, "kyverno.io": {"ClusterPolicy"}}


def _errors(docs: list[dict[str, Any]], version: str) -> list[str]:
    errors = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            # An unknown kind or apiVersion is an error too, not a pass.
            errors.append(f"{where}: {e.message}")
    return errors


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_the_rendered_chart_is_valid_kubernetes(value_set: str, version: str) -> None:
    docs = documents(render(VALUE_SETS[value_set], version))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert ("HorizontalPodAutoscaler" in kinds) is (value_set != "no-autoscaling")
    assert _errors(docs, version) == []


def test_strict_validation_refuses_a_field_kubernetes_does_not_know() -> None:
    docs = documents(render(VALUE_SETS["default"], KUBE_VERSIONS[0]))
    deployment = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    hpa = copy.deepcopy(next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler"))
    hpa["apiVersion"] = "autoscaling/v2beta2"  # removed in 1.26
    (bad_field, gone_api) = _errors([deployment, hpa], KUBE_VERSIONS[0])
    assert "imagePullPolcy" in bad_field
    assert "autoscaling/v2beta2" in gone_api


def test_plain_manifests_outside_the_chart_are_valid_kubernetes() -> None:
    crds: set[str] = set()
    for path in sorted((ROOT / "k8s").rglob("*.yaml")):
        if CHART in path.parents:
            continue  # templates, not manifests: rendered above
        plain = []
        for doc in documents(path.read_text()):
            group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
            if doc["kind"] in CRD_GROUPS.get(group, set()):
                crds.add(doc["kind"])
            else:
                plain.append(doc)
        for version in KUBE_VERSIONS:
            assert _errors(plain, version) == [], f"{Path(path).relative_to(ROOT)} ({version})"
    # Every custom kind skipped above is one k8s/ really holds: none is skipped by accident.
    assert crds == set().union(*CRD_GROUPS.values())
