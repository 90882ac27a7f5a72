"""Health of live objects, after Argo CD's built-in health checks.

A resource is Healthy, Progressing, Degraded, Suspended, Missing or Unknown.
Rules exist for Deployment, StatefulSet, DaemonSet, Job, Pod, Service,
Ingress and PersistentVolumeClaim; anything else is Healthy once it exists.
A rollout whose controller has not yet seen the latest spec
(``observedGeneration`` behind ``generation``) is Progressing, never Healthy,
and a Deployment past its progress deadline is Degraded rather than
Progressing for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from autoecoops.kernel.infra_manager.model import Health

Obj = Mapping[str, Any]
Result = tuple[Health, str]


def _status(obj: Obj) -> Mapping[str, Any]:
    return obj.get("status") or {}


def _spec(obj: Obj) -> Mapping[str, Any]:
    return obj.get("spec") or {}


def _behind(obj: Obj) -> bool:
    generation = (obj.get("metadata") or {}).get("generation") or 0
    return int(_status(obj).get("observedGeneration") or 0) < int(generation)


def _condition(obj: Obj, type_: str) -> Mapping[str, Any] | None:
    for c in _status(obj).get("conditions") or ():
        if isinstance(c, Mapping) and c.get("type") == type_:
            return c
    return None


def deployment(obj: Obj) -> Result:
    """Argo CD's Deployment check."""
    spec, st = _spec(obj), _status(obj)
    if spec.get("paused"):
        return Health.SUSPENDED, "Deployment is paused"
    if _behind(obj):
        return Health.PROGRESSING, "Waiting for rollout to finish: observed generation is behind"
    progressing = _condition(obj, "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return (
            Health.DEGRADED,
            f"Deployment {obj['metadata']['name']!r} exceeded its progress deadline",
        )
    replicas = int(spec.get("replicas", 1))
    updated = int(st.get("updatedReplicas") or 0)
    total = int(st.get("replicas") or 0)
    available = int(st.get("availableReplicas") or 0)
    if updated < replicas:
        return Health.PROGRESSING, f"{updated} of {replicas} updated replicas are available"
    if total > updated:
        return Health.PROGRESSING, f"{total - updated} old replicas are pending termination"
    if available < updated:
        return Health.PROGRESSING, f"{available} of {updated} updated replicas are available"
    return Health.HEALTHY, ""


def statefulset(obj: Obj) -> Result:
    """Argo CD's StatefulSet check."""
    spec, st = _spec(obj), _status(obj)
    if _behind(obj):
        return Health.PROGRESSING, "Waiting for statefulset spec update to be observed"
    replicas = int(spec.get("replicas", 1))
    ready = int(st.get("readyReplicas") or 0)
    if ready < replicas:
        return Health.PROGRESSING, f"{ready} of {replicas} pods are ready"
    strategy = spec.get("updateStrategy") or {}
    if strategy.get("type") == "OnDelete":
        return Health.HEALTHY, "updateStrategy OnDelete: rollout is manual"
    partition = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
    if partition:
        updated = int(st.get("updatedReplicas") or 0)
        if updated < replicas - partition:
            return (
                Health.PROGRESSING,
                f"{updated} of {replicas - partition} pods updated (partitioned)",
            )
        return Health.HEALTHY, ""
    if st.get("updateRevision") and st.get("currentRevision") != st.get("updateRevision"):
        return Health.PROGRESSING, "Waiting for the rolling update to complete"
    return Health.HEALTHY, ""


def daemonset(obj: Obj) -> Result:
    """Argo CD's DaemonSet check."""
    spec, st = _spec(obj), _status(obj)
    if _behind(obj):
        return Health.PROGRESSING, "Waiting for daemon set spec update to be observed"
    if (spec.get("updateStrategy") or {}).get("type") == "OnDelete":
        return Health.HEALTHY, "updateStrategy OnDelete: rollout is manual"
    desired = int(st.get("desiredNumberScheduled") or 0)
    updated = int(st.get("updatedNumberScheduled") or 0)
    available = int(st.get("numberAvailable") or 0)
    if updated < desired:
        return Health.PROGRESSING, f"{updated} of {desired} pods updated"
    if available < desired:
        return Health.PROGRESSING, f"{available} of {desired} updated pods are available"
    return Health.HEALTHY, ""


def job(obj: Obj) -> Result:
    """Failed is Degraded, Complete is Healthy, suspended is Suspended."""
    failed = _condition(obj, "Failed")
    if failed is not None and failed.get("status") == "True":
        return Health.DEGRADED, str(failed.get("message") or "Job failed")
    complete = _condition(obj, "Complete")
    if complete is not None and complete.get("status") == "True":
        return Health.HEALTHY, str(complete.get("message") or "")
    if _spec(obj).get("suspend"):
        return Health.SUSPENDED, "Job is suspended"
    return Health.PROGRESSING, "Job is running"


def pod(obj: Obj) -> Result:
    """By phase; a restartPolicy Never/OnFailure pod that succeeded is Healthy."""
    phase = _status(obj).get("phase", "")
    if phase == "Succeeded":
        return Health.HEALTHY, ""
    if phase == "Failed":
        return Health.DEGRADED, str(_status(obj).get("message") or "Pod failed")
    if phase == "Running":
        ready = _condition(obj, "Ready")
        if ready is not None and ready.get("status") == "True":
            return Health.HEALTHY, ""
        return Health.PROGRESSING, "Pod is running but not ready"
    return Health.PROGRESSING, f"Pod is {phase or 'Pending'}"


def _has_ingress(obj: Obj) -> bool:
    return bool(((_status(obj).get("loadBalancer") or {}).get("ingress")) or ())


def service(obj: Obj) -> Result:
    """A LoadBalancer Service is Progressing until it has an address."""
    if _spec(obj).get("type") == "LoadBalancer" and not _has_ingress(obj):
        return Health.PROGRESSING, "Waiting for the load balancer's address"
    return Health.HEALTHY, ""


def ingress(obj: Obj) -> Result:
    """An Ingress is Progressing until the controller publishes an address."""
    if not _has_ingress(obj):
        return Health.PROGRESSING, "Waiting for the ingress controller to publish an address"
    return Health.HEALTHY, ""


def pvc(obj: Obj) -> Result:
    """Bound is Healthy, Pending is Progressing, Lost is Degraded."""
    phase = _status(obj).get("phase", "")
    if phase == "Bound":
        return Health.HEALTHY, ""
    if phase == "Lost":
        return Health.DEGRADED, "the claim lost its volume"
    return Health.PROGRESSING, f"the claim is {phase or 'Pending'}"


RULES: Mapping[tuple[str, str], Callable[[Obj], Result]] = {
    ("apps", "Deployment"): deployment,
    ("apps", "StatefulSet"): statefulset,
    ("apps", "DaemonSet"): daemonset,
    ("batch", "Job"): job,
    ("", "Pod"): pod,
    ("", "Service"): service,
    ("networking.k8s.io", "Ingress"): ingress,
    ("", "PersistentVolumeClaim"): pvc,
}


def assess(obj: Obj | None) -> Result:
    """The health of a live object (Missing when it does not exist)."""
    if obj is None:
        return Health.MISSING, ""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    rule = RULES.get((group, str(obj.get("kind", ""))))
    if rule is None:
        return Health.HEALTHY, ""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return Health.PROGRESSING, "being deleted"
    try:
        return rule(obj)
    except (TypeError, ValueError, KeyError) as err:
        # A status the rule cannot read (a controller's bug, a hand edit).
        return Health.UNKNOWN, f"cannot assess health: {err}"


def worst(healths: Iterable[Health]) -> Health:
    """The aggregate health: the worst of them (Healthy when there are none)."""
    out = Health.HEALTHY
    for h in healths:
        if h.rank > out.rank:
            out = h
    return out


def ready_status(obj: Obj) -> dict[str, Any] | None:
    """The status a controller writes once ``obj`` has rolled out (the embedded
    cluster's simulated controllers), or None for kinds without one."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    kind = obj.get("kind")
    spec = _spec(obj)
    generation = (obj.get("metadata") or {}).get("generation") or 1
    if (group, kind) == ("apps", "Deployment"):
        n = int(spec.get("replicas", 1))
        return {
            "observedGeneration": generation,
            "replicas": n,
            "updatedReplicas": n,
            "readyReplicas": n,
            "availableReplicas": n,
            "conditions": [{"type": "Available", "status": "True"}],
        }
    if (group, kind) == ("apps", "StatefulSet"):
        n = int(spec.get("replicas", 1))
        return {
            "observedGeneration": generation,
            "replicas": n,
            "readyReplicas": n,
            "updatedReplicas": n,
            "currentRevision": f"rev-{generation}",
            "updateRevision": f"rev-{generation}",
        }
    if (group, kind) == ("apps", "DaemonSet"):
        return {
            "observedGeneration": generation,
            "desiredNumberScheduled": 1,
            "updatedNumberScheduled": 1,
            "numberAvailable": 1,
        }
    if (group, kind) == ("batch", "Job"):
        return {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    if (group, kind) == ("", "Pod"):
        return {"phase": "Succeeded"}
    if (group, kind) == ("", "PersistentVolumeClaim"):
        return {"phase": "Bound"}
    if (group, kind) == ("networking.k8s.io", "Ingress") or (
        (group, kind) == ("", "Service") and spec.get("type") == "LoadBalancer"
    ):
        return {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}
    return None
