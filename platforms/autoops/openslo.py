"""OpenSLO v1 (https://github.com/OpenSLO/OpenSLO) import and export: SLO, SLI, AlertPolicy.

Mapping, both ways:
- ``SLO.spec.indicator`` (inline) or ``indicatorRef`` (an ``SLI`` document) ->
  ``Slo.indicator``: ``ratioMetric`` good/bad/total queries, or
  ``thresholdMetric`` (a histogram's base name) with the objective's
  ``op: lte`` and ``value`` (seconds) as the threshold.
- ``metricSource.type``: ``Prometheus`` -> PROMETHEUS; ``AutoEcoOpsPushed`` ->
  PUSHED; ``AutoEcoOpsMesh`` (spec ``grpcService``, ``grpcMethod``) -> MESH.
- ``timeWindow[0]``: ``isRolling: true`` with a duration -> rolling; ``false``
  with 1d/1w/1M/1Q -> a calendar day/week/month/quarter.
- ``objectives[0].target`` -> objective.
- ``AlertPolicy`` conditions of ``kind: burnrate``: ``threshold`` -> burn rate,
  ``lookbackWindow`` -> the long window, ``alertAfter`` -> the short window,
  ``severity`` page/critical -> CRITICAL, ticket/warning -> MEDIUM.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import yaml
from google.protobuf import duration_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.common.v1 import types_pb2
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument, NotFound
from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.slo import period_of, rows_of, short_id, validate

if TYPE_CHECKING:
    from autoecoops.platforms.autoops.engine import SloEngine

API = "openslo/v1"
_DUR = re.compile(r"^(\d+)(s|m|h|d|w|M|Q|Y)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_CAL = {
    "1d": pb.CALENDAR_UNIT_DAY,
    "1w": pb.CALENDAR_UNIT_WEEK,
    "1M": pb.CALENDAR_UNIT_MONTH,
    "1Q": pb.CALENDAR_UNIT_QUARTER,
}
_SEVERITY = {
    "page": types_pb2.SEVERITY_CRITICAL,
    "critical": types_pb2.SEVERITY_CRITICAL,
    "high": types_pb2.SEVERITY_HIGH,
    "ticket": types_pb2.SEVERITY_MEDIUM,
    "warning": types_pb2.SEVERITY_MEDIUM,
    "medium": types_pb2.SEVERITY_MEDIUM,
    "low": types_pb2.SEVERITY_LOW,
    "info": types_pb2.SEVERITY_INFO,
}


class OpenSloError(InvalidArgument):
    """An OpenSLO document this platform cannot read."""


def _bad(where: str, why: str) -> OpenSloError:
    return OpenSloError(
        f"{where}: {why}",
        reason="INVALID_OPENSLO",
        field_violations=[FieldViolation(f"yaml.{where}", why)],
    )


def _seconds(text: str, where: str) -> float:
    m = _DUR.match(str(text).strip())
    if not m or m.group(2) not in _UNIT:
        raise _bad(where, f"{text!r} is not a duration like 5m, 1h, 30d")
    return int(m.group(1)) * _UNIT[m.group(2)]


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _source(ms: dict[str, Any], where: str) -> tuple[int, str, dict[str, Any]]:
    kind = str(ms.get("type", "")).lower()
    spec = ms.get("spec") or {}
    if kind == "prometheus":
        query = spec.get("query") or spec.get("promql")
        if not query:
            raise _bad(f"{where}.metricSource.spec.query", "required for Prometheus")
        return pb.SLI_SOURCE_PROMETHEUS, str(query), spec
    if kind in ("autoecoopspushed", "pushed"):
        return pb.SLI_SOURCE_PUSHED, "", spec
    if kind in ("autoecoopsmesh", "mesh"):
        return pb.SLI_SOURCE_MESH, "", spec
    raise _bad(
        f"{where}.metricSource.type",
        f"{ms.get('type')!r} is not supported (Prometheus, AutoEcoOpsPushed, AutoEcoOpsMesh)",
    )


def _indicator(sli: dict[str, Any], objective: dict[str, Any], where: str) -> pb.Indicator:
    ind = pb.Indicator()
    if "ratioMetric" in sli:
        rm = sli["ratioMetric"] or {}
        if "raw" in rm:
            raise _bad(
                f"{where}.ratioMetric.raw", "precomputed ratios are not supported; give counters"
            )
        sources = {}
        for part in ("good", "bad", "total"):
            if part in rm:
                ms = (rm[part] or {}).get("metricSource") or {}
                sources[part] = _source(ms, f"{where}.ratioMetric.{part}")
        if "total" not in sources or ("good" in sources) == ("bad" in sources):
            raise _bad(f"{where}.ratioMetric", "needs total and exactly one of good and bad")
        src = sources["total"][0]
        ind.source = src  # type: ignore[assignment]
        ind.ratio.total = sources["total"][1]
        if "good" in sources:
            ind.ratio.good = sources["good"][1]
        else:
            ind.ratio.bad = sources["bad"][1]
        if src == pb.SLI_SOURCE_MESH:
            spec = sources["total"][2]
            ind.mesh.grpc_service = str(spec.get("grpcService", ""))
            ind.mesh.grpc_method = str(spec.get("grpcMethod", ""))
        return ind
    if "thresholdMetric" in sli:
        ms = (sli["thresholdMetric"] or {}).get("metricSource") or {}
        src, query, spec = _source(ms, f"{where}.thresholdMetric")
        ind.source = src  # type: ignore[assignment]
        ind.threshold.metric = query
        if str(objective.get("op", "lte")) not in ("lte", "lt"):
            raise _bad(
                "spec.objectives[0].op", "a threshold SLI needs op lte (value under the threshold)"
            )
        if "value" not in objective:
            raise _bad(
                "spec.objectives[0].value", "a threshold SLI needs the threshold value (seconds)"
            )
        ind.threshold.threshold.CopyFrom(_dur(float(objective["value"])))
        if src == pb.SLI_SOURCE_MESH:
            ind.mesh.grpc_service = str(spec.get("grpcService", ""))
            ind.mesh.grpc_method = str(spec.get("grpcMethod", ""))
        return ind
    raise _bad(where, "an SLI needs ratioMetric (counters, not raw) or thresholdMetric")


def _alert_policy(
    doc: dict[str, Any], where: str, conditions: dict[str, dict[str, Any]]
) -> list[pb.BurnRateWindow]:
    rows = []
    for i, cond in enumerate((doc.get("spec") or {}).get("conditions") or []):
        if isinstance(cond, dict) and "conditionRef" in cond:
            ref = str(cond["conditionRef"])
            if ref not in conditions:
                raise _bad(
                    f"{where}.spec.conditions[{i}].conditionRef", f"no AlertCondition named {ref!r}"
                )
            cond = conditions[ref]
        spec = (cond or {}).get("spec") or cond or {}
        c = spec.get("condition") or {}
        at = f"{where}.spec.conditions[{i}]"
        if str(c.get("kind", "burnrate")).lower() != "burnrate":
            raise _bad(f"{at}.condition.kind", "only burnrate conditions are supported")
        long_w = _seconds(c.get("lookbackWindow", ""), f"{at}.condition.lookbackWindow")
        short_w = (
            _seconds(c.get("alertAfter", ""), f"{at}.condition.alertAfter")
            if c.get("alertAfter")
            else long_w / 12
        )
        sev = _SEVERITY.get(str(spec.get("severity", "page")).lower())
        if sev is None:
            raise _bad(f"{at}.severity", f"{spec.get('severity')!r} is not a known severity")
        rows.append(
            pb.BurnRateWindow(
                long_window=_dur(long_w),
                short_window=_dur(short_w),
                burn_rate=float(c.get("threshold", 0)),
                severity=sev,  # type: ignore[arg-type]
            )
        )
    return rows


def _labels(raw: Any) -> dict[str, str]:
    out = {}
    for k, v in (raw or {}).items():
        out[str(k)] = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return out


def parse(text: str, now: float) -> list[tuple[str, pb.Slo]]:
    """(slo id, Slo) for every SLO document; INVALID_ARGUMENT naming what is wrong."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as err:
        raise _bad("yaml", str(err).splitlines()[0]) from None
    slis: dict[str, dict[str, Any]] = {}
    policies: dict[str, dict[str, Any]] = {}
    conditions: dict[str, dict[str, Any]] = {}
    slo_docs = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or d.get("apiVersion") != API:
            raise _bad(f"documents[{i}].apiVersion", f"must be {API}")
        name = str((d.get("metadata") or {}).get("name", ""))
        kind = d.get("kind")
        if kind == "SLI":
            slis[name] = d
        elif kind == "AlertPolicy":
            policies[name] = d
        elif kind == "SLO":
            slo_docs.append((i, d))
        elif kind == "AlertCondition":
            conditions[name] = d
        elif kind not in ("Service", "DataSource", "AlertNotificationTarget"):
            raise _bad(f"documents[{i}].kind", f"{kind!r} is not an OpenSLO v1 kind")
    out = []
    for i, d in slo_docs:
        where = f"documents[{i}]"
        meta = d.get("metadata") or {}
        spec = d.get("spec") or {}
        objectives = spec.get("objectives") or []
        if not objectives:
            raise _bad(f"{where}.spec.objectives", "at least one objective")
        objective = objectives[0]
        if "indicator" in spec:
            sli = (spec["indicator"] or {}).get("spec") or {}
        elif spec.get("indicatorRef") in slis:
            sli = slis[spec["indicatorRef"]].get("spec") or {}
        else:
            raise _bad(
                f"{where}.spec.indicatorRef",
                f"no SLI named {spec.get('indicatorRef')!r} in the documents",
            )
        slo = pb.Slo(
            service=str(spec.get("service", "")),
            description=str(spec.get("description", "")),
            display_name=str(meta.get("displayName", "")),
            objective=float(
                objective["target"]
                if "target" in objective
                else float(objective.get("targetPercent", 0)) / 100
            ),
            labels=_labels(meta.get("labels")),
        )
        slo.indicator.CopyFrom(_indicator(sli, objective, f"{where}.spec.indicator.spec"))
        owner = (meta.get("annotations") or {}).get("openslo.com/owner") or spec.get("owner")
        if owner:
            slo.owner = str(owner)
        tws = spec.get("timeWindow") or []
        if tws:
            tw = tws[0]
            if tw.get("isRolling", True):
                slo.time_window.rolling.CopyFrom(
                    _dur(_seconds(tw.get("duration", ""), f"{where}.spec.timeWindow[0].duration"))
                )
            else:
                unit = _CAL.get(str(tw.get("duration", "")))
                if unit is None:
                    raise _bad(
                        f"{where}.spec.timeWindow[0].duration",
                        "a calendar window is 1d, 1w, 1M or 1Q",
                    )
                slo.time_window.calendar = unit  # type: ignore[assignment]
        for j, ref in enumerate(spec.get("alertPolicies") or []):
            policy = ref if isinstance(ref, dict) else policies.get(str(ref))
            if policy is None:
                raise _bad(
                    f"{where}.spec.alertPolicies[{j}]",
                    f"no AlertPolicy named {ref!r} in the documents",
                )
            slo.alert_policy.windows.extend(
                _alert_policy(policy, f"{where}.spec.alertPolicies[{j}]", conditions)
            )
        sid = str(meta.get("name", ""))
        slo.name = f"slos/{sid}"
        validate(slo, now, prefix=f"{where}")
        out.append((sid, slo))
    if not out:
        raise _bad("yaml", "no SLO document found")
    return out


async def import_into(engine: SloEngine, text: str, validate_only: bool) -> list[pb.Slo]:
    """Create (or replace the spec of) every SLO the documents describe."""
    from autoecoops.platforms.autoops.slo import check_id

    parsed = parse(text, engine.clock())
    for sid, _ in parsed:
        check_id(sid, "metadata.name")
    if validate_only:
        return [s for _, s in parsed]
    from google.protobuf import field_mask_pb2

    out = []
    for sid, slo in parsed:
        try:
            await engine.get(f"slos/{sid}")
        except NotFound:
            stored, verb = await engine.create(sid, slo), "created"
        else:
            stored, verb = await engine.update(slo, field_mask_pb2.FieldMask()), "updated"
        # One entry per SLO, naming it, with the caller as actor.
        await engine.kernel.audit(
            "autoops.slo.import",
            stored.name,
            details={"result": verb, "objective": stored.objective, "service": stored.service},
            actor=current_principal.get(),
        )
        out.append(stored)
    return out


def _fmt(seconds: float) -> str:
    return burn.window_label(seconds)


def _metric_source(ind: pb.Indicator, query: str) -> dict[str, Any]:
    if ind.source == pb.SLI_SOURCE_PROMETHEUS:
        return {"metricSource": {"type": "Prometheus", "spec": {"query": query}}}
    if ind.source == pb.SLI_SOURCE_MESH:
        spec = {"grpcService": ind.mesh.grpc_service}
        if ind.mesh.grpc_method:
            spec["grpcMethod"] = ind.mesh.grpc_method
        return {"metricSource": {"type": "AutoEcoOpsMesh", "spec": spec}}
    return {"metricSource": {"type": "AutoEcoOpsPushed", "spec": {}}}


def to_documents(slo: pb.Slo) -> list[dict[str, Any]]:
    """The OpenSLO SLO document (with its AlertPolicy, if it has its own rows)."""
    sid = short_id(slo.name)
    ind = slo.indicator
    objective: dict[str, Any] = {"displayName": slo.display_name or sid, "target": slo.objective}
    if ind.WhichOneof("kind") == "threshold":
        sli_spec: dict[str, Any] = {"thresholdMetric": _metric_source(ind, ind.threshold.metric)}
        objective["op"] = "lte"
        objective["value"] = ind.threshold.threshold.ToNanoseconds() / 1e9
    else:
        ratio: dict[str, Any] = {"counter": True}
        if ind.ratio.good or not ind.ratio.bad:
            ratio["good"] = _metric_source(ind, ind.ratio.good)
        if ind.ratio.bad:
            ratio["bad"] = _metric_source(ind, ind.ratio.bad)
        ratio["total"] = _metric_source(ind, ind.ratio.total)
        sli_spec = {"ratioMetric": ratio}
    tw = slo.time_window
    if tw.WhichOneof("kind") == "calendar":
        unit = {v: k for k, v in _CAL.items()}[tw.calendar]
        window = {
            "duration": unit,
            "isRolling": False,
            "calendar": {"startTime": "2020-01-01 00:00:00", "timeZone": "UTC"},
        }
    else:
        secs = tw.rolling.ToNanoseconds() / 1e9 if tw.HasField("rolling") else 30 * burn.DAY
        window = {"duration": _fmt(secs), "isRolling": True}
    meta: dict[str, Any] = {"name": sid}
    if slo.display_name:
        meta["displayName"] = slo.display_name
    if slo.labels:
        meta["labels"] = dict(slo.labels)
    if slo.owner:
        meta["annotations"] = {"openslo.com/owner": slo.owner}
    spec: dict[str, Any] = {
        "description": slo.description,
        "service": slo.service,
        "indicator": {"metadata": {"name": f"{sid}-sli"}, "spec": sli_spec},
        "timeWindow": [window],
        "budgetingMethod": "Occurrences",
        "objectives": [objective],
    }
    docs: list[dict[str, Any]] = [
        {"apiVersion": API, "kind": "SLO", "metadata": meta, "spec": spec}
    ]
    if slo.alert_policy.windows:
        conditions = []
        # Rows given as budget_consumed export with the burn rate they mean.
        rates = [r.burn_rate for r in rows_of(slo, period_of(slo, time.time()))]
        for i, w in enumerate(slo.alert_policy.windows):
            sev = "page" if w.severity >= types_pb2.SEVERITY_HIGH or not w.severity else "ticket"
            conditions.append(
                {
                    "kind": "AlertCondition",
                    "metadata": {"name": f"{sid}-burn-{i}"},
                    "spec": {
                        "severity": sev,
                        "condition": {
                            "kind": "burnrate",
                            "op": "gte",
                            "threshold": w.burn_rate or rates[i],
                            "lookbackWindow": _fmt(w.long_window.ToNanoseconds() / 1e9),
                            "alertAfter": _fmt(w.short_window.ToNanoseconds() / 1e9),
                        },
                    },
                }
            )
        docs.append(
            {
                "apiVersion": API,
                "kind": "AlertPolicy",
                "metadata": {"name": f"{sid}-alerts"},
                "spec": {"alertWhenBreaching": True, "conditions": conditions},
            }
        )
        spec["alertPolicies"] = [f"{sid}-alerts"]
    return docs


def export(slos: list[pb.Slo]) -> str:
    """OpenSLO v1 YAML for ``slos``."""
    docs = [d for s in slos for d in to_documents(s)]
    out: str = yaml.safe_dump_all(docs, sort_keys=False)
    return out
