"""Rendering logic without Git or tools: source kinds, helm output naming, image overrides."""

from __future__ import annotations

import pytest

from autoecoops.kernel.infra_manager.manifests import ManifestError
from autoecoops.kernel.infra_manager.model import HelmSource, KustomizeSource, Source
from autoecoops.kernel.infra_manager.render import (
    SourceKind,
    _image,
    helm_documents,
    source_kind,
)


def test_the_kind_of_a_source_follows_argo_cds_rule() -> None:
    plain = Source("/r", path="p")
    assert source_kind(plain, {"a.yaml", "b.yml"}) is SourceKind.DIRECTORY
    assert source_kind(plain, {"Chart.yaml", "values.yaml"}) is SourceKind.HELM
    assert source_kind(plain, {"kustomization.yaml"}) is SourceKind.KUSTOMIZE
    assert source_kind(plain, {"Kustomization"}) is SourceKind.KUSTOMIZE
    # Options decide when set, whatever the directory holds.
    assert source_kind(Source("/r", helm=HelmSource()), {"a.yaml"}) is SourceKind.HELM
    assert (
        source_kind(Source("/r", kustomize=KustomizeSource()), {"Chart.yaml"})
        is SourceKind.KUSTOMIZE
    )


def test_helm_output_is_named_by_template_in_the_repository() -> None:
    out = (
        "---\n# Source: shop/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap\n"
        "metadata: {name: a}\n---\n# Source: shop/templates/cm.yaml\napiVersion: v1\n"
        "kind: ConfigMap\nmetadata: {name: b}\n---\n# Source: shop/charts/db/templates/s.yaml\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\n"
    )
    docs = helm_documents(out, "charts/shop", "shop")
    assert [(d.path, d.index, d.line, d.obj["metadata"]["name"]) for d in docs] == [
        ("charts/shop/templates/cm.yaml", 0, 0, "a"),
        ("charts/shop/templates/cm.yaml", 1, 0, "b"),
        ("charts/shop/charts/db/templates/s.yaml", 0, 0, "db"),
    ]
    assert docs[0].text.startswith("# Source: shop/templates/cm.yaml\n")
    assert helm_documents(out, "", "shop")[0].path == "templates/cm.yaml"
    with pytest.raises(ManifestError) as err:
        helm_documents("---\n# Source: shop/templates/x.yaml\nkind: [\n", "c", "shop")
    assert err.value.violations[0].field == "c/templates/x.yaml#0"


@pytest.mark.parametrize(
    ("arg", "entry"),
    [
        ("nginx:1.27", {"name": "nginx", "newTag": "1.27"}),
        (
            "nginx=registry.local:5000/nginx:1.27",
            {"name": "nginx", "newName": "registry.local:5000/nginx", "newTag": "1.27"},
        ),
        ("registry.local:5000/api:2.0", {"name": "registry.local:5000/api", "newTag": "2.0"}),
        ("api@sha256:abc", {"name": "api", "digest": "sha256:abc"}),
        ("api=other@sha256:abc", {"name": "api", "newName": "other", "digest": "sha256:abc"}),
    ],
)
def test_image_overrides_read_as_kustomize_edit_set_image_does(
    arg: str, entry: dict[str, str]
) -> None:
    assert _image(arg) == entry
