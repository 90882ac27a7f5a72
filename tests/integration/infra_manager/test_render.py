"""Helm charts and Kustomize overlays as sources, rendered by the real helm and kubectl."""

from __future__ import annotations

import dataclasses

import pytest

from autoecoops.kernel.infra_manager.model import (
    Application,
    HelmParameter,
    HelmSource,
    KustomizeSource,
    Ref,
    Source,
    SyncCode,
)
from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument
from tests.integration.infra_manager.conftest import ADMIN, TOOLS, Infra, configmap, succeeded

pytestmark = pytest.mark.skipif(
    not (TOOLS / "helm").exists() or not (TOOLS / "kubectl").exists(),
    reason="helm and kubectl come with ./dev test (need_helm)",
)

CHART = {
    "charts/web/Chart.yaml": "apiVersion: v2\nname: web\nversion: 0.1.0\nkubeVersion: '>=1.27.0-0'\n",
    "charts/web/values.yaml": "replicas: 1\nimage: nginx:1.25\ngreeting: hello\ncpu: 500m\n",
    "charts/web/values-prod.yaml": "replicas: 3\n",
    "charts/web/templates/_helpers.tpl": '{{- define "web.name" -}}{{ .Release.Name }}-web{{- end -}}\n',
    "charts/web/templates/deploy.yaml": """apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "web.name" . }}
  namespace: {{ .Release.Namespace }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: main
          image: {{ .Values.image }}
          resources:
            limits: {cpu: {{ .Values.cpu }}, memory: 64Mi}
""",
    "charts/web/templates/config.yaml": """apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-config
data:
  greeting: {{ .Values.greeting | quote }}
  kube: {{ .Capabilities.KubeVersion.Version | quote }}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-second
data: {}
""",
}


def helm_app(infra: Infra, helm: HelmSource | None = None, name: str = "web") -> Application:
    app = infra.app(name, path="charts/web")
    return dataclasses.replace(app, source=dataclasses.replace(app.source, helm=helm))


async def test_a_helm_chart_renders_with_values_release_namespace_and_kube_version(
    infra: Infra,
) -> None:
    commit = infra.repo.commit(CHART)
    # Detected by its Chart.yaml alone: release = the app's name, namespace = the destination.
    await infra.create(helm_app(infra))
    revision, rendered = await infra.manager.manifests("web")
    assert revision == commit
    assert [(r.ref, r.source_path, r.document_index, r.line) for r in rendered] == [
        (
            Ref("", "v1", "ConfigMap", "team-a", "web-config"),
            "charts/web/templates/config.yaml",
            0,
            0,
        ),
        (
            Ref("", "v1", "ConfigMap", "team-a", "web-second"),
            "charts/web/templates/config.yaml",
            1,
            0,
        ),
        (
            Ref("apps", "v1", "Deployment", "team-a", "web-web"),
            "charts/web/templates/deploy.yaml",
            0,
            0,
        ),
    ]
    assert "# Source: web/templates/config.yaml" in rendered[0].yaml
    # The embedded cluster's version reaches the chart (its kubeVersion needs >= 1.27).
    assert 'kube: "v1.30.0"' in rendered[0].yaml
    op = succeeded(await infra.sync())
    assert len(op.results) == 3
    live = await infra.live("Deployment", "web-web", group="apps")
    assert live is not None and live["spec"]["replicas"] == 1

    # Values files in order, inline values, --set, release name, namespace, kube version.
    spec = HelmSource(
        value_files=("values-prod.yaml",),
        values="greeting: inline\nimage: nginx:1.27\n",
        parameters=(HelmParameter("image", "nginx:1.28"), HelmParameter("cpu", "250m", True)),
        release_name="shop",
        namespace="team-a",
        kube_version="1.29.3",
    )
    await infra.manager.update(helm_app(infra, spec), ADMIN)
    _rev, rendered = await infra.manager.manifests("web")
    by = {r.ref.name: r for r in rendered}
    assert set(by) == {"shop-config", "shop-second", "shop-web"}
    assert "replicas: 3" in by["shop-web"].yaml and "image: nginx:1.28" in by["shop-web"].yaml
    assert "cpu: 250m" in by["shop-web"].yaml and "namespace: team-a" in by["shop-web"].yaml
    assert 'greeting: "inline"' in by["shop-config"].yaml
    assert 'kube: "v1.29.3"' in by["shop-config"].yaml
    succeeded(await infra.sync(prune=True))
    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.SYNCED, status
    assert await infra.live("Deployment", "web-web", group="apps") is None  # pruned


async def test_helm_errors_name_the_chart_or_the_field(infra: Infra) -> None:
    infra.repo.commit(CHART)
    # A kube version the chart refuses: helm's own message, on the chart's path.
    with pytest.raises(InvalidArgument) as old:
        await infra.create(helm_app(infra, HelmSource(kube_version="1.20.0")))
    assert old.value.reason == "INVALID_MANIFESTS"
    (v,) = old.value.field_violations
    assert v.field == "charts/web" and "kubeVersion" in v.description
    with pytest.raises(InvalidArgument) as missing:
        await infra.create(helm_app(infra, HelmSource(value_files=("nope.yaml",))))
    assert [f.field for f in missing.value.field_violations] == [
        "application.source.helm.value_files[0]"
    ]
    await infra.create(
        helm_app(infra, HelmSource(value_files=("nope.yaml",), ignore_missing_value_files=True))
    )
    with pytest.raises(InvalidArgument) as bad:
        await infra.create(
            helm_app(
                infra,
                HelmSource(values="- a list", value_files=("../x.yaml",), release_name="Bad_Name"),
                name="other",
            )
        )
    assert sorted(f.field for f in bad.value.field_violations) == [
        "application.source.helm.release_name",
        "application.source.helm.value_files[0]",
        "application.source.helm.values",
    ]
    # A template that does not render.
    infra.repo.commit({"charts/web/templates/broken.yaml": "{{ .Values.nope.deeper }}\n"})
    with pytest.raises(FailedPrecondition) as broken:
        await infra.manager.manifests("web")
    assert broken.value.reason == "INVALID_MANIFESTS"
    assert "broken.yaml" in broken.value.field_violations[0].description


async def test_a_missing_tool_is_failed_precondition_naming_it(infra: Infra) -> None:
    infra.repo.commit(CHART)
    infra.manager.renderer.tools = dataclasses.replace(
        infra.manager.renderer.tools, helm="/nonexistent/helm"
    )
    with pytest.raises(FailedPrecondition) as err:
        await infra.create(helm_app(infra))
    assert err.value.reason == "TOOL_NOT_FOUND"
    assert err.value.metadata["tool"] == "helm" and "helm" in err.value.message
    assert not await infra.store.exists("web")


OVERLAY = {
    "kz/base/kustomization.yaml": "resources: [cm.yaml, deploy.yaml]\n",
    "kz/base/cm.yaml": configmap("settings", {"cpu": "500m"}),
    "kz/base/deploy.yaml": """apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  replicas: 1
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: main, image: "registry.local:5000/api:1.0"}]
""",
    "kz/prod/kustomization.yaml": "bases: [../base]\nnamePrefix: prod-\n",
}


async def test_a_kustomize_overlay_renders_with_the_applications_options(infra: Infra) -> None:
    infra.repo.commit(OVERLAY)
    app = infra.app(path="kz/prod")
    await infra.create(app)
    _rev, rendered = await infra.manager.manifests("web")
    assert sorted(r.ref.name for r in rendered) == ["prod-api", "prod-settings"]
    assert {r.source_path for r in rendered} == {"kz/prod/kustomization.yaml"}
    succeeded(await infra.sync())

    spec = KustomizeSource(
        name_suffix="-v2",
        images=("registry.local:5000/api=registry.local:5000/api:2.0",),
        common_labels=(("team", "shop"),),
    )
    await infra.manager.update(
        dataclasses.replace(app, source=dataclasses.replace(app.source, kustomize=spec)),
        ADMIN,
    )
    _rev, rendered = await infra.manager.manifests("web")
    by = {r.ref.name: r for r in rendered}
    assert set(by) == {"prod-api-v2", "prod-settings-v2"}
    assert "image: registry.local:5000/api:2.0" in by["prod-api-v2"].yaml
    assert "team: shop" in by["prod-settings-v2"].yaml

    infra.repo.commit({"kz/prod/kustomization.yaml": "bases: [../missing]\n"})
    with pytest.raises(FailedPrecondition) as err:
        await infra.manager.manifests("web")
    assert err.value.reason == "INVALID_MANIFESTS"
    assert err.value.field_violations[0].field == "kz/prod"


def test_source_round_trips_through_the_store_format() -> None:
    s = Source(
        "/r",
        "main",
        "c",
        HelmSource(("a.yaml",), "x: 1", (HelmParameter("a", "b", True),), "rel", "ns", "1.29"),
        None,
    )
    assert Source.from_dict(s.to_dict()) == s
    k = Source("/r", kustomize=KustomizeSource("p-", "", ("a:1",), (("l", "v"),), (), "ns"))
    assert Source.from_dict(k.to_dict()) == k
