"""GitOps behaviour against real Git repositories and the embedded cluster on a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from autoecoops.kernel.infra_manager.model import (
    Automated,
    Backoff,
    Health,
    IgnoreRule,
    Phase,
    Ref,
    ResourceSync,
    ResultCode,
    Retry,
    SyncCode,
)
from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument
from tests.integration.infra_manager.conftest import (
    ADMIN,
    Infra,
    configmap,
    deployment,
    hook_job,
    succeeded,
)

WEB = Ref("apps", "v1", "Deployment", "team-a", "web")
SETTINGS = Ref("", "v1", "ConfigMap", "team-a", "settings")


def two_resources(replicas: int = 1) -> dict[str, str | None]:
    """A Deployment and a ConfigMap in one multi-document file, plus a nested file."""
    return {
        "deploy/app.yaml": deployment("web", replicas) + "---\n" + configmap("settings"),
        "deploy/extra/notes.yml": configmap("notes", {"a": "b"}),
        "deploy/README.md": "not a manifest",
    }


async def test_create_and_sync(infra: Infra) -> None:
    commit = infra.repo.commit(two_resources())
    await infra.create(infra.app())
    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.OUT_OF_SYNC
    assert {r.status for r in status.resources} == {ResourceSync.MISSING}
    assert status.health is Health.MISSING

    op = succeeded(await infra.sync())
    assert op.revision == commit and op.initiated_by == "alice"
    assert [r.ref.kind for r in op.results] == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
    ]  # kind order
    live = await infra.cluster.get(WEB)
    assert live is not None
    assert live["metadata"]["labels"]["autoecoops.io/application"] == "web"
    assert live["metadata"]["generation"] == 1 and live["metadata"]["resourceVersion"]

    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None
    assert (status.sync, status.health, status.revision) == (
        SyncCode.SYNCED,
        Health.HEALTHY,
        commit,
    )
    assert len(status.resources) == 3

    (entry,) = await infra.manager.history("web")
    assert (entry.id, entry.revision, entry.initiated_by) == (1, commit, "alice")
    assert entry.manifest_digest.startswith("sha256:")
    assert infra.events.names() == ["SyncStarted", "SyncSucceeded"]
    (done,) = infra.events.of("SyncSucceeded")
    assert (done.resource_count, done.history_id, done.revision) == (3, 1, commit)
    (audited,) = infra.audit.of("infra.sync")
    assert audited["details"]["phase"] == "Succeeded" and audited["actor"].subject == "alice"


async def test_drift_by_editing_a_live_object_is_detected_and_reported_once(infra: Infra) -> None:
    infra.repo.commit(two_resources(replicas=2))
    await infra.create(infra.app())
    succeeded(await infra.sync())
    await infra.reconciler.reconcile("web")

    def scale(obj: dict) -> None:  # type: ignore[type-arg]
        obj["spec"]["replicas"] = 5

    await infra.cluster.update(WEB, scale)  # kubectl scale, as another client
    await infra.reconciler.reconcile("web")
    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.OUT_OF_SYNC
    assert {str(r.ref): r.status for r in status.resources}[str(WEB)] is ResourceSync.OUT_OF_SYNC

    cmp = await infra.manager.diff("web")
    (drifted,) = cmp.drifted()
    text = drifted.text()
    assert "--- live/apps/Deployment/team-a/web" in text and "+++ desired/" in text
    assert "-  replicas: 5" in text and "+  replicas: 2" in text
    (event,) = infra.events.of("DriftDetected")
    assert [r.resource.name for r in event.drifted_resources] == ["web"]
    assert event.self_heal is False
    # Manual apps are not corrected.
    live = await infra.cluster.get(WEB)
    assert live is not None and live["spec"]["replicas"] == 5


async def test_self_heal_corrects_live_drift(infra: Infra) -> None:
    infra.repo.commit(two_resources())
    await infra.create(infra.app(automated=Automated(self_heal=True)))
    await infra.settle()  # the first reconcile auto-syncs the new revision
    ops = infra.events.of("SyncSucceeded")
    assert len(ops) == 1

    await infra.cluster.update(WEB, lambda o: o["spec"].update(replicas=7))
    await infra.settle()  # drift detected, self-heal syncs
    await infra.manager.wait("web")
    live = await infra.cluster.get(WEB)
    assert live is not None and live["spec"]["replicas"] == 1
    (drift,) = infra.events.of("DriftDetected")
    assert drift.self_heal is True
    assert len(infra.events.of("SyncSucceeded")) == 2
    op = await infra.store.operation("web")
    assert op is not None and op.initiated_by == "automated"
    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.SYNCED


async def test_without_self_heal_drift_stays_and_detect_only_never_syncs(infra: Infra) -> None:
    infra.repo.commit(two_resources())
    await infra.create(infra.app("plain", automated=Automated()))
    await infra.create(
        infra.app(
            "watch",
            path="deploy",
            namespace="team-b",
            automated=Automated(self_heal=True),
            policy={"detect_only": True},
        )
    )
    await infra.settle("plain")
    await infra.settle("watch")
    assert (
        await infra.cluster.get(Ref("apps", "v1", "Deployment", "team-b", "web")) is None
    )  # detect-only
    watch = await infra.store.status("watch")
    assert watch is not None and watch.sync is SyncCode.OUT_OF_SYNC

    plain_web = Ref("apps", "v1", "Deployment", "team-a", "web")
    await infra.cluster.update(plain_web, lambda o: o["spec"].update(replicas=4))
    await infra.settle("plain")
    live = await infra.cluster.get(plain_web)
    assert (
        live is not None and live["spec"]["replicas"] == 4
    )  # selfHeal off: reported, not corrected
    drifts = {e.application: e for e in infra.events.of("DriftDetected")}
    assert drifts["watch"].self_heal is False and drifts["plain"].self_heal is False
    assert [e.application for e in infra.events.of("SyncStarted")] == ["plain"]


async def test_server_wide_detect_only_mode(infra: Infra) -> None:
    import dataclasses

    infra.reconciler.settings = dataclasses.replace(infra.reconciler.settings, detect_only=True)
    infra.repo.commit(two_resources())
    await infra.create(infra.app(automated=Automated(self_heal=True, prune=True)))
    await infra.settle()
    assert await infra.cluster.get(WEB) is None
    assert infra.events.names() == ["DriftDetected"]


async def test_ignore_differences_and_defaulted_fields_are_not_drift(infra: Infra) -> None:
    infra.repo.commit(two_resources())
    rule = IgnoreRule("Deployment", "apps", "web", json_pointers=("/spec/replicas",))
    await infra.create(infra.app(ignore_differences=(rule,)))
    succeeded(await infra.sync())

    def controllers(obj: dict) -> None:  # type: ignore[type-arg]
        obj["spec"]["replicas"] = 9  # an HPA scaled it: ignored by the rule
        pod = obj["spec"]["template"]["spec"]
        pod["dnsPolicy"] = "ClusterFirst"  # defaulted by the API server
        pod["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
        pod["containers"][0]["resources"]["limits"]["cpu"] = "0.5"  # the same quantity as 500m
        obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"

    await infra.cluster.update(WEB, controllers)
    cmp = await infra.manager.diff("web")
    assert cmp.sync is SyncCode.SYNCED, [d.text() for d in cmp.drifted()]

    await infra.cluster.update(
        WEB, lambda o: o["spec"]["template"]["spec"]["containers"][0].update(image="evil:1")
    )
    cmp = await infra.manager.diff("web")
    (d,) = cmp.drifted()
    assert "-    - image: evil:1" in d.text() or "image: evil:1" in d.text()


async def test_prune_only_when_asked_and_never_to_empty_without_allow_empty(infra: Infra) -> None:
    infra.repo.commit(two_resources())
    await infra.create(infra.app())
    succeeded(await infra.sync())
    infra.repo.commit({"deploy/extra/notes.yml": None})
    notes = Ref("", "v1", "ConfigMap", "team-a", "notes")

    cmp = await infra.manager.diff("web")
    assert [(str(d.ref), d.status) for d in cmp.drifted()] == [
        (str(notes), ResourceSync.EXTRANEOUS)
    ]
    op = succeeded(await infra.sync())
    assert [(r.ref, r.code) for r in op.results if r.ref == notes] == [
        (notes, ResultCode.PRUNE_SKIPPED)
    ]
    assert await infra.cluster.get(notes) is not None
    op = succeeded(await infra.sync(prune=True))
    assert await infra.cluster.get(notes) is None
    (pruned,) = infra.audit.of("infra.prune")
    assert pruned["details"]["pruned"] == [str(notes)]

    # Automated prune: an empty Git path is not pruned to empty without allowEmpty.
    await infra.manager.update(infra.app(automated=Automated(prune=True)), ADMIN)
    infra.repo.commit({"deploy/app.yaml": None})
    await infra.settle()
    assert await infra.cluster.get(WEB) is not None
    status = await infra.store.status("web")
    assert status is not None
    assert [c.type for c in status.conditions] == ["SyncError"]
    assert "allow_empty" in status.conditions[0].message

    await infra.manager.update(
        infra.app(automated=Automated(prune=True, allow_empty=True)),
        ADMIN,
    )
    await infra.settle()
    await infra.manager.wait("web")
    assert await infra.cluster.get(WEB) is None
    assert await infra.cluster.list_app("web") == []


async def test_waves_apply_in_order_and_each_waits_for_health(infra: Infra) -> None:
    infra.cluster.simulate_ready = False  # this test plays the Deployment controller
    infra.repo.commit(
        {
            "deploy/a.yaml": configmap("late", **{"autoecoops.io/sync-wave": "1"}),
            "deploy/b.yaml": deployment("web"),
            "deploy/c.yaml": configmap("early", **{"argocd.argoproj.io/sync-wave": "-1"}),
            "deploy/d.yaml": configmap("also-zero"),
        }
    )
    await infra.create(infra.app())
    await infra.manager.sync("web", ADMIN)
    late = Ref("", "v1", "ConfigMap", "team-a", "late")
    for _ in range(200):
        if await infra.cluster.get(WEB) is not None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # several health polls: wave 0 is waiting
    assert await infra.cluster.get(late) is None
    running = await infra.store.operation("web")
    assert running is not None and running.phase is Phase.RUNNING
    live = await infra.cluster.get(WEB)
    assert live is not None
    await infra.cluster.set_status(
        WEB,
        {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
    )
    op = succeeded(await infra.manager.wait("web"))
    assert [r.ref.name for r in op.results] == ["early", "also-zero", "web", "late"]
    assert await infra.cluster.get(late) is not None


async def test_a_wave_that_never_gets_healthy_fails_and_runs_syncfail(infra: Infra) -> None:
    infra.cluster.simulate_ready = False
    infra.repo.commit(
        {
            "deploy/app.yaml": deployment("web"),
            "deploy/fail.yaml": hook_job("notify", "SyncFail").replace("kind: Job", "kind: Job", 1),
        }
    )
    await infra.create(infra.app())
    op = await infra.sync()
    assert op.phase is Phase.FAILED
    assert "wave 0 was not Healthy within 0.5s" in op.message and "Progressing" in op.message
    assert [r.message.split(":")[0] for r in op.results if r.ref.name == "notify"] == [
        "SyncFail hook"
    ]


async def test_a_failing_apply_runs_syncfail_hooks_and_records_no_history(infra: Infra) -> None:
    infra.repo.commit(
        {
            "deploy/ok.yaml": configmap("first"),
            "deploy/bad.yaml": configmap("Bad_Name", **{"autoecoops.io/sync-wave": "2"}),
            "deploy/hooks.yaml": hook_job("on-fail", "SyncFail")
            + "---\n"
            + hook_job("after", "PostSync"),
        }
    )
    await infra.create(infra.app())
    op = await infra.sync()
    assert op.phase is Phase.FAILED
    assert "Bad_Name" in op.message and "RFC 1123" in op.message
    codes = {r.ref.name: r.code for r in op.results}
    assert codes == {
        "first": ResultCode.SYNCED,
        "Bad_Name": ResultCode.SYNC_FAILED,
        "on-fail": ResultCode.SYNCED,
    }
    hook = await infra.cluster.get(Ref("batch", "v1", "Job", "team-a", "on-fail"))
    assert hook is not None  # BeforeHookCreation keeps it until the next run
    assert await infra.cluster.get(Ref("batch", "v1", "Job", "team-a", "after")) is None
    assert await infra.manager.history("web") == []
    (failed,) = infra.events.of("SyncFailed")
    assert [r.resource.name for r in failed.failed_resources] == ["Bad_Name"]
    assert failed.will_retry is False
    (audited,) = infra.audit.of("infra.sync")
    assert audited["details"]["phase"] == "Failed" and audited["outcome"] != 0


async def test_hooks_run_around_the_waves_and_follow_their_delete_policy(infra: Infra) -> None:
    infra.repo.commit(
        {
            "deploy/app.yaml": configmap("settings"),
            "deploy/hooks.yaml": hook_job("migrate", "PreSync", "HookSucceeded")
            + "---\n"
            + hook_job("smoke", "PostSync"),
        }
    )
    await infra.create(infra.app())
    op = succeeded(await infra.sync())
    assert [r.ref.name for r in op.results] == ["migrate", "settings", "smoke"]
    assert (
        await infra.cluster.get(Ref("batch", "v1", "Job", "team-a", "migrate")) is None
    )  # HookSucceeded
    assert await infra.cluster.get(Ref("batch", "v1", "Job", "team-a", "smoke")) is not None
    cmp = await infra.manager.diff("web")
    assert cmp.sync is SyncCode.SYNCED  # hooks are never extraneous


async def test_a_failed_hook_job_fails_the_sync(infra: Infra) -> None:
    infra.cluster.simulate_ready = False
    infra.repo.commit(
        {"deploy/hooks.yaml": hook_job("migrate", "PreSync"), "deploy/app.yaml": configmap("x")}
    )
    await infra.create(infra.app())
    await infra.manager.sync("web", ADMIN)
    job = Ref("batch", "v1", "Job", "team-a", "migrate")
    for _ in range(200):
        if await infra.cluster.get(job) is not None:
            break
        await asyncio.sleep(0.01)
    await infra.cluster.set_status(
        job, {"conditions": [{"type": "Failed", "status": "True", "message": "exit 1"}]}
    )
    op = await infra.manager.wait("web")
    assert op is not None and op.phase is Phase.FAILED
    assert "PreSync hook batch/Job/team-a/migrate failed: exit 1" in op.message
    assert await infra.cluster.get(Ref("", "v1", "ConfigMap", "team-a", "x")) is None


async def test_retries_follow_the_backoff(infra: Infra) -> None:
    infra.repo.commit({"deploy/bad.yaml": configmap("Bad_Name")})
    retry = Retry(limit=2, backoff=Backoff(duration=0.01, factor=2, max_duration=0.05))
    await infra.create(infra.app(policy={"retry": retry}))
    op = await infra.sync()
    assert op.phase is Phase.FAILED and op.retry_count == 2
    assert [e.will_retry for e in infra.events.of("SyncFailed")] == [True, True, False]


async def test_history_is_limited_and_rollback_reapplies_an_old_revision(infra: Infra) -> None:
    first = infra.repo.commit(two_resources(replicas=1))
    await infra.create(infra.app(revision_history_limit=2))
    succeeded(await infra.sync())
    second = infra.repo.commit(two_resources(replicas=2))
    succeeded(await infra.sync())
    third = infra.repo.commit(two_resources(replicas=3))
    succeeded(await infra.sync())
    history = await infra.manager.history("web")
    assert [(e.id, e.revision) for e in history] == [(3, third), (2, second)]
    assert await infra.store.manifests("web", history[0].manifest_digest) is not None

    await infra.manager.rollback("web", 2, ADMIN)
    op = succeeded(await infra.manager.wait("web"))
    assert (op.revision, op.rollback_history_id) == (second, 2)
    live = await infra.cluster.get(WEB)
    assert live is not None and live["spec"]["replicas"] == 2
    history = await infra.manager.history("web")
    assert [(e.id, e.revision) for e in history] == [(4, second), (3, third)]
    (done,) = infra.events.of("RollbackCompleted")
    assert (done.history_id, done.revision, done.previous_revision) == (2, second, third)
    (audited,) = infra.audit.of("infra.rollback")
    assert audited["details"]["rollback_history_id"] == 2
    assert first not in {e.revision for e in history}


async def test_rollback_turns_auto_sync_off_and_auto_sync_then_leaves_it(infra: Infra) -> None:
    infra.repo.commit(two_resources(replicas=1))
    await infra.create(infra.app(automated=Automated(self_heal=True)))
    await infra.settle()
    infra.repo.commit(two_resources(replicas=2))
    await infra.settle()
    await infra.manager.wait("web")
    live = await infra.cluster.get(WEB)
    assert live is not None and live["spec"]["replicas"] == 2

    with pytest.raises(FailedPrecondition) as refused:
        await infra.manager.rollback("web", 1, ADMIN)
    assert refused.value.reason == "AUTO_SYNC_ENABLED"
    assert (await infra.cluster.get(WEB))["spec"]["replicas"] == 2  # type: ignore[index]

    await infra.manager.rollback("web", 1, ADMIN, disable_auto_sync=True)
    succeeded(await infra.manager.wait("web"))
    assert (await infra.store.get("web")).automated is None
    await infra.reconciler.reconcile("web")
    await infra.manager.wait("web")
    live = await infra.cluster.get(WEB)
    assert live is not None and live["spec"]["replicas"] == 1  # not re-synced to main
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.OUT_OF_SYNC


async def test_bad_input_is_refused_and_leaves_live_state_untouched(infra: Infra) -> None:
    infra.repo.commit(two_resources())
    with pytest.raises(InvalidArgument) as bad_url:
        await infra.create(_with_url(infra, "ftp://example/x.git"))
    assert bad_url.value.reason == "REPOSITORY_URL_INVALID"
    assert [v.field for v in bad_url.value.field_violations] == ["application.source.repo_url"]
    with pytest.raises(InvalidArgument) as missing_repo:
        await infra.create(_with_url(infra, str(infra.tmp / "nothing-here")))
    assert missing_repo.value.reason == "REPOSITORY_UNREACHABLE"
    with pytest.raises(InvalidArgument) as bad_rev:
        await infra.create(_with_revision(infra, "no-such-branch"))
    assert bad_rev.value.reason == "REVISION_NOT_FOUND"
    assert [v.field for v in bad_rev.value.field_violations] == [
        "application.source.target_revision"
    ]
    assert await infra.store.names() == []

    await infra.create(infra.app())
    succeeded(await infra.sync())
    before = await infra.cluster.list_app("web")

    with pytest.raises(InvalidArgument) as rev:
        await infra.manager.sync("web", ADMIN, revision="0" * 40)
    assert (
        rev.value.reason == "REVISION_NOT_FOUND"
        and rev.value.field_violations[0].field == "revision"
    )

    infra.repo.commit({"deploy/broken.yaml": "kind: ConfigMap\nmetadata: {name: [unclosed\n"})
    with pytest.raises(FailedPrecondition) as yaml_err:
        await infra.manager.sync("web", ADMIN)
    assert yaml_err.value.reason == "INVALID_MANIFESTS"
    (v,) = yaml_err.value.field_violations
    assert v.field == "deploy/broken.yaml#0" and "invalid YAML at line 3" in v.description
    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.UNKNOWN
    assert status.conditions[0].type == "ComparisonError"

    infra.repo.commit(
        {
            "deploy/broken.yaml": "apiVersion: v1\nmetadata: {name: x}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
        }
    )
    with pytest.raises(FailedPrecondition) as shape:
        await infra.manager.sync("web", ADMIN)
    assert [(v.field, v.description) for v in shape.value.field_violations] == [
        ("deploy/broken.yaml#0", "no kind"),
        ("deploy/broken.yaml#1", "no metadata.name"),
    ]

    with pytest.raises(InvalidArgument) as unknown:
        await infra.manager.rollback("web", 42, ADMIN)
    assert unknown.value.reason == "HISTORY_NOT_FOUND"
    assert await infra.cluster.list_app("web") == before
    assert len(await infra.manager.history("web")) == 1


async def test_a_namespace_the_caller_may_not_deploy_to_is_refused(infra: Infra) -> None:
    from autoecoops.kernel.mesh.auth import Principal

    bob = Principal("bob")
    infra.repo.commit(two_resources())
    with pytest.raises(InvalidArgument) as other_ns:
        await infra.create(infra.app(namespace="team-b"), bob)
    assert other_ns.value.reason == "DESTINATION_NOT_PERMITTED"
    assert other_ns.value.field_violations[0].field == "application.destination.namespace"
    await infra.create(infra.app(), bob)  # team-a is bob's
    infra.repo.commit(
        {
            "deploy/sneaky.yaml": configmap("x").replace(
                "name: x", "name: x\n  namespace: kube-system"
            )
        }
    )
    with pytest.raises(FailedPrecondition) as sneaky:
        await infra.manager.sync("web", bob)
    assert sneaky.value.reason == "DESTINATION_NOT_PERMITTED"
    assert sneaky.value.metadata["namespaces"] == "kube-system"
    assert await infra.cluster.list_app("web") == []


async def test_only_one_operation_at_a_time(infra: Infra) -> None:
    infra.cluster.simulate_ready = False
    infra.repo.commit({"deploy/app.yaml": deployment("web")})
    await infra.create(infra.app())
    await infra.manager.sync("web", ADMIN)
    with pytest.raises(FailedPrecondition) as busy:
        await infra.manager.sync("web", ADMIN)
    assert busy.value.reason == "OPERATION_IN_PROGRESS"
    op = await infra.manager.wait("web")
    assert (
        op is not None and op.phase is Phase.FAILED
    )  # the wave timed out: nobody played the controller


def _with_url(infra: Infra, url: str):  # type: ignore[no-untyped-def]
    import dataclasses

    app = infra.app()
    return dataclasses.replace(app, source=dataclasses.replace(app.source, repo_url=url))


def _with_revision(infra: Infra, revision: str):  # type: ignore[no-untyped-def]
    import dataclasses

    app = infra.app()
    return dataclasses.replace(
        app, source=dataclasses.replace(app.source, target_revision=revision)
    )


async def test_the_diff_shows_quantities_as_written_in_git(infra: Infra) -> None:
    infra.repo.commit({"deploy/app.yaml": deployment("web")})  # limits: {cpu: 500m, memory: 128Mi}
    await infra.create(infra.app())
    succeeded(await infra.sync())
    # The same amounts written another way are no drift; another field is.
    await infra.cluster.update(
        WEB,
        lambda o: (
            o["spec"].update(replicas=4),
            o["spec"]["template"]["spec"]["containers"][0]["resources"].update(
                limits={"cpu": "0.5", "memory": "134217728"}
            ),
        ),
    )
    cmp = await infra.manager.diff("web")
    (d,) = cmp.drifted()
    text = d.text()
    assert "-  replicas: 4\n" in text and "+  replicas: 1\n" in text
    assert "'0.5'" not in text and "134217728" not in text
    assert not any(line.startswith(("-", "+")) and "cpu" in line for line in text.splitlines())
    # The whole desired side, as written, when the object is missing.
    await infra.cluster.delete(WEB)
    (missing,) = (await infra.manager.diff("web")).drifted()
    shown = missing.text()
    assert "+            cpu: 500m\n" in shown and "+            memory: 128Mi\n" in shown
    assert "'0.5'" not in shown and "134217728" not in shown


async def test_two_applications_declaring_one_object_both_get_a_shared_resource_warning(
    infra: Infra,
) -> None:
    infra.repo.commit(
        {
            "a/shared.yaml": configmap("settings") + "---\n" + configmap("only-a"),
            "b/shared.yaml": configmap("settings", {"owner": "b"}),
        }
    )
    await infra.create(infra.app("app-a", path="a"))
    await infra.create(infra.app("app-b", path="b"))
    succeeded(await infra.sync("app-a"))
    succeeded(await infra.sync("app-b"))  # takes the ConfigMap over
    for name in ("app-a", "app-b"):
        await infra.reconciler.reconcile(name)
    for name in ("app-a", "app-b"):
        status = await infra.store.status(name)
        assert status is not None
        (warning,) = [c for c in status.conditions if c.type == "SharedResourceWarning"]
        assert warning.message == (
            "ConfigMap/team-a/settings is part of applications app-a and app-b"
        )
    # b stops declaring it: after their next reconciles neither is warned any more.
    infra.repo.commit({"b/shared.yaml": configmap("other")})
    for name in ("app-b", "app-a"):
        await infra.reconciler.reconcile(name)
    for name in ("app-a", "app-b"):
        status = await infra.store.status(name)
        assert status is not None
        assert not [c for c in status.conditions if c.type == "SharedResourceWarning"]
    # A deleted application's declarations go with it.
    infra.repo.commit({"b/shared.yaml": configmap("settings")})
    await infra.reconciler.reconcile("app-b")
    await infra.manager.delete("app-b", False, ADMIN)
    await infra.reconciler.reconcile("app-a")
    status = await infra.store.status("app-a")
    assert status is not None and not status.conditions
