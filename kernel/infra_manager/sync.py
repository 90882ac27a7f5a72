"""One sync operation: hooks, waves, health gates, prune, and SyncFail on failure.

The order is Argo CD's. PreSync hooks run first; then each sync wave in
ascending order (the ``sync-wave`` annotation, default 0), its resources
applied by kind order (Namespaces before ConfigMaps before Deployments...)
and then name, together with the Sync hooks of that wave; the next wave
starts only once this one is Healthy, within ``wave_timeout``. Extraneous
resources are pruned after the last wave (only when pruning was asked for),
then PostSync hooks run. Any failure stops the operation and runs the
SyncFail hooks.

Every wait is bounded: a hook that never finishes fails after
``hook_timeout``, a wave that never becomes Healthy after ``wave_timeout``,
and a Degraded resource fails its wave at once instead of waiting it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autoecoops.kernel.infra_manager.cluster import ApplyError, Cluster, ClusterUnavailable
from autoecoops.kernel.infra_manager.diff import ident
from autoecoops.kernel.infra_manager.health import assess
from autoecoops.kernel.infra_manager.manifests import (
    DeletePolicy,
    HookType,
    Manifest,
    annotation,
    is_tracked,
)
from autoecoops.kernel.infra_manager.model import (
    Health,
    Operation,
    Phase,
    Ref,
    ResourceResult,
    ResultCode,
)

#: gitops-engine's kind order: what others depend on goes first.
KIND_ORDER = (
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
)
_KIND_RANK = {k: i for i, k in enumerate(KIND_ORDER)}
#: Kinds whose hooks run to completion (other hook kinds are done once created).
_RUNNABLE = {("batch", "Job"), ("", "Pod"), ("argoproj.io", "Workflow")}


def order_key(m: Manifest) -> tuple[int, int, str, str]:
    """Wave, then kind order (unknown kinds last), then namespace/name."""
    return (
        m.wave,
        _KIND_RANK.get(m.ref.kind, len(KIND_ORDER)),
        m.ref.kind,
        f"{m.ref.namespace}/{m.ref.name}",
    )


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The bounds of every wait in a sync, in seconds."""

    wave: float = 300.0
    hook: float = 600.0
    poll: float = 1.0


@dataclass(slots=True)
class SyncPlan:
    """What one operation applies."""

    app: str
    manifests: Sequence[Manifest]
    #: The application's live objects before the sync (for prune).
    live: Sequence[Mapping[str, Any]] = ()
    prune: bool = False
    dry_run: bool = False
    #: Identities to sync; None syncs everything.
    only: set[tuple[str, str, str, str]] | None = None


@dataclass(slots=True)
class SyncResult:
    """How an operation ended."""

    phase: Phase
    message: str
    results: list[ResourceResult] = field(default_factory=list)

    @property
    def applied(self) -> int:
        """Resources applied or pruned."""
        return sum(r.code in (ResultCode.SYNCED, ResultCode.PRUNED) for r in self.results)

    @property
    def pruned(self) -> list[Ref]:
        """The resources deleted by prune."""
        return [r.ref for r in self.results if r.code is ResultCode.PRUNED]

    @property
    def failed(self) -> list[ResourceResult]:
        """The resources and hooks that failed."""
        return [r for r in self.results if r.code is ResultCode.SYNC_FAILED]


class _Failed(Exception):
    """Stops the phases; the message becomes the operation's."""


Progress = Callable[[list[ResourceResult]], Awaitable[None]]


async def _no_progress(_results: list[ResourceResult]) -> None:
    return None


class SyncEngine:
    """Runs sync operations against one cluster."""

    def __init__(
        self,
        cluster: Cluster,
        timeouts: Timeouts = Timeouts(),
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.timeouts = timeouts
        self._sleep = sleep
        self._clock = clock

    async def run(self, plan: SyncPlan, progress: Progress = _no_progress) -> SyncResult:
        """Run every phase; never raises for a cluster problem, it fails the operation."""
        results: list[ResourceResult] = []
        selected = [m for m in plan.manifests if plan.only is None or ident(m.ref) in plan.only]
        resources = sorted((m for m in selected if not m.is_hook), key=order_key)
        hooks = [m for m in plan.manifests if m.is_hook and plan.only is None]
        extraneous = self._extraneous(plan)
        try:
            if plan.dry_run:
                await self._dry_run(resources, extraneous, plan.prune, results)
                return SyncResult(
                    Phase.SUCCEEDED,
                    f"dry run: {len(resources)} resources would be applied",
                    results,
                )
            await self._hooks(HookType.PRE_SYNC, hooks, results, progress)
            for wave in sorted({m.wave for m in resources} | self._hook_waves(hooks)):
                in_wave = [m for m in resources if m.wave == wave]
                await self._apply(in_wave, results, progress)
                await self._hooks(
                    HookType.SYNC, [h for h in hooks if h.wave == wave], results, progress
                )
                await self._wait_healthy(wave, in_wave)
            await self._prune(extraneous, plan.prune, results, progress)
            await self._hooks(HookType.POST_SYNC, hooks, results, progress)
        except _Failed as failed:
            message = str(failed)
            try:
                await self._hooks(HookType.SYNC_FAIL, hooks, results, progress)
            except _Failed as also:
                message += f"; SyncFail hook failed too: {also}"
            return SyncResult(Phase.FAILED, message, results)
        skipped = sum(r.code is ResultCode.PRUNE_SKIPPED for r in results)
        message = f"successfully synced {len(resources)} resources"
        if skipped:
            message += f"; {skipped} extraneous resources kept (prune not enabled)"
        return SyncResult(Phase.SUCCEEDED, message, results)

    @staticmethod
    def _hook_waves(hooks: Iterable[Manifest]) -> set[int]:
        return {h.wave for h in hooks if HookType.SYNC in h.hooks}

    @staticmethod
    def _extraneous(plan: SyncPlan) -> list[Ref]:
        declared = {ident(m.ref) for m in plan.manifests}
        out = []
        for obj in plan.live:
            ref = Ref.of(dict(obj))
            if ident(ref) in declared or annotation(obj, "hook") is not None:
                continue
            if not is_tracked(obj, plan.app):
                continue
            if plan.only is not None and ident(ref) not in plan.only:
                continue
            out.append(ref)
        return sorted(
            out,
            key=lambda r: (-_KIND_RANK.get(r.kind, len(KIND_ORDER)), r.kind, r.namespace, r.name),
        )

    async def _dry_run(
        self,
        resources: Sequence[Manifest],
        extraneous: Sequence[Ref],
        prune: bool,
        results: list[ResourceResult],
    ) -> None:
        failures = []
        for m in resources:
            try:
                await self.cluster.apply(m.obj, dry_run=True)
                results.append(
                    ResourceResult(m.ref, ResultCode.SYNCED, "would be applied (dry run)")
                )
            except (ApplyError, ClusterUnavailable) as err:
                results.append(ResourceResult(m.ref, ResultCode.SYNC_FAILED, _msg(err)))
                failures.append(str(m.ref))
        for ref in extraneous:
            code = ResultCode.PRUNED if prune else ResultCode.PRUNE_SKIPPED
            results.append(
                ResourceResult(
                    ref, code, "would be pruned (dry run)" if prune else "prune not enabled"
                )
            )
        if failures:
            raise _Failed(
                f"dry run: {len(failures)} resources would be refused: {', '.join(failures[:5])}"
            )

    async def _apply(
        self, wave: Sequence[Manifest], results: list[ResourceResult], progress: Progress
    ) -> None:
        for m in wave:
            try:
                await self.cluster.apply(m.obj)
            except (ApplyError, ClusterUnavailable) as err:
                results.append(ResourceResult(m.ref, ResultCode.SYNC_FAILED, _msg(err)))
                await progress(results)
                raise _Failed(f"{m.ref}: {_msg(err)}") from None
            results.append(ResourceResult(m.ref, ResultCode.SYNCED, "applied"))
        if wave:
            await progress(results)

    async def _wait_healthy(self, wave: int, manifests: Sequence[Manifest]) -> None:
        if not manifests:
            return
        refs = [m.ref for m in manifests]
        deadline = self._clock() + self.timeouts.wave
        while True:
            objs = await self._get_many(refs)
            waiting: list[str] = []
            for ref, obj in zip(refs, objs, strict=True):
                health, message = assess(obj)
                if health is Health.DEGRADED:
                    raise _Failed(f"wave {wave}: {ref} is Degraded: {message}")
                if health not in (Health.HEALTHY, Health.SUSPENDED):
                    waiting.append(f"{ref} ({health.value}{': ' + message if message else ''})")
            if not waiting:
                return
            if self._clock() >= deadline:
                raise _Failed(
                    f"wave {wave} was not Healthy within {self.timeouts.wave:g}s: waiting for "
                    + ", ".join(waiting[:5])
                )
            await self._sleep(self.timeouts.poll)

    async def _get_many(self, refs: Sequence[Ref]) -> list[dict[str, Any] | None]:
        try:
            return await self.cluster.get_many(refs)
        except ClusterUnavailable as err:
            raise _Failed(str(err)) from None

    async def _prune(
        self, refs: Sequence[Ref], prune: bool, results: list[ResourceResult], progress: Progress
    ) -> None:
        for ref in refs:
            if not prune:
                results.append(ResourceResult(ref, ResultCode.PRUNE_SKIPPED, "prune not enabled"))
                continue
            try:
                await self.cluster.delete(ref)
            except (ApplyError, ClusterUnavailable) as err:
                results.append(
                    ResourceResult(ref, ResultCode.SYNC_FAILED, f"prune failed: {_msg(err)}")
                )
                raise _Failed(f"{ref}: prune failed: {_msg(err)}") from None
            results.append(ResourceResult(ref, ResultCode.PRUNED, "pruned"))
        if refs:
            await progress(results)

    async def _hooks(
        self,
        kind: HookType,
        hooks: Sequence[Manifest],
        results: list[ResourceResult],
        progress: Progress,
    ) -> None:
        for hook in sorted((h for h in hooks if kind in h.hooks), key=order_key):
            ok, message = await self._run_hook(hook)
            results.append(
                ResourceResult(
                    hook.ref,
                    ResultCode.SYNCED if ok else ResultCode.SYNC_FAILED,
                    f"{kind.value} hook: {message}",
                )
            )
            await progress(results)
            if not ok:
                raise _Failed(f"{kind.value} hook {hook.ref} failed: {message}")

    async def _run_hook(self, hook: Manifest) -> tuple[bool, str]:
        try:
            if DeletePolicy.BEFORE_HOOK_CREATION in hook.delete_policies:
                await self.cluster.delete(hook.ref)
            await self.cluster.apply(hook.obj)
        except (ApplyError, ClusterUnavailable) as err:
            return False, _msg(err)
        ok, message = True, "created"
        if (hook.ref.group, hook.ref.kind) in _RUNNABLE:
            ok, message = await self._wait_hook(hook.ref)
        policy = DeletePolicy.HOOK_SUCCEEDED if ok else DeletePolicy.HOOK_FAILED
        if policy in hook.delete_policies:
            try:
                await self.cluster.delete(hook.ref)
                message += "; deleted"
            except (ApplyError, ClusterUnavailable) as err:
                message += f"; could not delete it: {_msg(err)}"
        return ok, message

    async def _wait_hook(self, ref: Ref) -> tuple[bool, str]:
        deadline = self._clock() + self.timeouts.hook
        while True:
            try:
                obj = await self.cluster.get(ref)
            except ClusterUnavailable as err:
                return False, str(err)
            health, message = assess(obj)
            if health is Health.HEALTHY:
                return True, "completed"
            if health in (Health.DEGRADED, Health.MISSING):
                return False, message or f"{health.value}"
            if self._clock() >= deadline:
                return False, f"did not finish within {self.timeouts.hook:g}s ({message})"
            await self._sleep(self.timeouts.poll)


def _msg(err: Exception) -> str:
    return getattr(err, "message", None) or str(err)


def finished(op: Operation, result: SyncResult, end_time: float) -> Operation:
    """The operation with the result's phase, message and resource results."""
    return replace(
        op,
        phase=result.phase,
        message=result.message,
        results=tuple(result.results),
        end_time=end_time,
    )
