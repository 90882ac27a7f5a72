"""GetManifests: the rendered desired state of an application at a revision, from real Git."""

from __future__ import annotations

import pytest

from autoecoops.kernel.infra_manager.model import Ref
from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.integration.infra_manager.conftest import Infra, configmap, deployment, hook_job

APP_YAML = "# the web tier\n" + deployment("web") + "---\n" + configmap("settings", {"cpu": "500m"})


async def test_manifests_name_file_index_line_and_keep_the_yaml_as_written(infra: Infra) -> None:
    first = infra.repo.commit(
        {
            "deploy/app.yaml": APP_YAML,
            "deploy/jobs/migrate.yaml": hook_job("migrate", "PreSync"),
            "deploy/skip.yaml": configmap("skipped", **{"autoecoops.io/hook": "Skip"}),
            "deploy/ns.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-b}\n",
        }
    )
    await infra.create(infra.app())

    revision, rendered = await infra.manager.manifests("web")
    assert revision == first
    got = [(r.ref, r.source_path, r.document_index, r.line) for r in rendered]
    assert got == [
        (Ref("apps", "v1", "Deployment", "team-a", "web"), "deploy/app.yaml", 0, 1),
        (Ref("", "v1", "ConfigMap", "team-a", "settings"), "deploy/app.yaml", 1, 20),
        (Ref("batch", "v1", "Job", "team-a", "migrate"), "deploy/jobs/migrate.yaml", 0, 1),
        (Ref("", "v1", "Namespace", "", "team-b"), "deploy/ns.yaml", 0, 1),
    ]
    # Exactly as written: the quantity stays 500m, no tracking label is added.
    assert rendered[0].yaml == "# the web tier\n" + deployment("web")  # its comment included
    assert rendered[1].yaml == configmap("settings", {"cpu": "500m"})
    assert "autoecoops.io/application" not in rendered[0].yaml

    # An older revision stays readable after Git moves on.
    second = infra.repo.commit({"deploy/app.yaml": deployment("web", 3)})
    revision, now = await infra.manager.manifests("web", "main")
    assert revision == second and "replicas: 3" in now[0].yaml
    assert len([r for r in now if r.source_path == "deploy/app.yaml"]) == 1
    revision, old = await infra.manager.manifests("web", first)
    assert revision == first and [r.ref.name for r in old][:2] == ["web", "settings"]


async def test_manifests_refuse_bad_input_naming_the_field(infra: Infra) -> None:
    infra.repo.commit({"deploy/app.yaml": APP_YAML})
    await infra.create(infra.app())

    with pytest.raises(NotFound):
        await infra.manager.manifests("nope")
    with pytest.raises(InvalidArgument) as rev:
        await infra.manager.manifests("web", "no-such-branch")
    assert rev.value.reason == "REVISION_NOT_FOUND"
    assert [v.field for v in rev.value.field_violations] == ["revision"]

    infra.repo.commit({"deploy/broken.yaml": configmap("ok") + "---\nkind: [\n"})
    with pytest.raises(FailedPrecondition) as bad:
        await infra.manager.manifests("web")
    assert bad.value.reason == "INVALID_MANIFESTS"
    (v,) = bad.value.field_violations
    assert v.field == "deploy/broken.yaml#1" and "invalid YAML at line" in v.description
