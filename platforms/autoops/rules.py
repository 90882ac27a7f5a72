"""Prometheus recording and alerting rules for SLOs, named as Sloth names them.

A team with Prometheus can load these and get the same alerts the platform
raises: ``slo:sli_error:ratio_rate<window>`` per window,
``slo:objective:ratio``, ``slo:error_budget:ratio``, ``slo:time_period:days``,
``slo:current_burn_rate:ratio``, ``slo:period_burn_rate:ratio``,
``slo:period_error_budget_remaining:ratio`` and ``sloth_slo_info``, labelled
``sloth_id``/``sloth_service``/``sloth_slo``(/``sloth_window``), and one page
and one ticket alert whose expression ORs the rows of its severity, each row
ANDing its two windows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.slo import short_id, spec_of
from autoecoops.platforms.autoops.sources import le_matcher

_SHORTEST = 5 * burn.MINUTE


def camel(text: str) -> str:
    """``checkout-availability`` -> ``CheckoutAvailability``."""
    return "".join(p[:1].upper() + p[1:] for p in text.replace("_", "-").split("-") if p)


def alert_names(slo: pb.Slo) -> tuple[str, str]:
    """(page alert, ticket alert) names of an SLO."""
    base = camel(short_id(slo.name))
    return f"{base}PageAlert", f"{base}TicketAlert"


def sloth_id(slo: pb.Slo) -> str:
    """Sloth's ``<service>-<slo>`` id."""
    return f"{slo.service}-{short_id(slo.name)}"


def error_ratio(ind: pb.Indicator, window: str) -> str:
    """PromQL for the fraction of bad events over ``window``."""
    if ind.WhichOneof("kind") == "ratio":
        r = ind.ratio
        if r.bad:
            return f"(sum(rate({r.bad}[{window}])))\n/\n(sum(rate({r.total}[{window}])))"
        return f"1 - (\n(sum(rate({r.good}[{window}])))\n/\n(sum(rate({r.total}[{window}])))\n)"
    t = ind.threshold
    name, _, rest = t.metric.partition("{")
    labels = rest.rstrip("}")
    le = le_matcher(t.threshold.ToNanoseconds() / 1e9)
    bucket = f"{name}_bucket{{{','.join(p for p in (labels, le) if p)}}}"
    count = f"{name}_count{{{labels}}}" if labels else f"{name}_count"
    return f"1 - (\n(sum(rate({bucket}[{window}])))\n/\n(sum(rate({count}[{window}])))\n)"


def _matchers(labels: dict[str, str]) -> str:
    return ", ".join(f'{k}="{v}"' for k, v in labels.items())


def slo_groups(slo: pb.Slo, now: float) -> list[dict[str, Any]]:
    """The three rule groups (SLI recordings, meta recordings, alerts) of one SLO."""
    spec = spec_of(slo, now)
    sid = sloth_id(slo)
    base = {"sloth_id": sid, "sloth_service": slo.service, "sloth_slo": short_id(slo.name)}
    sel = _matchers(base)
    period = burn.window_label(spec.period)
    windows = sorted({*burn.windows_of(spec.rows), _SHORTEST})
    sli_rules: list[dict[str, Any]] = []
    for w in windows:
        label = burn.window_label(w)
        sli_rules.append(
            {
                "record": f"slo:sli_error:ratio_rate{label}",
                "expr": error_ratio(slo.indicator, label) + "\n",
                "labels": {**base, "sloth_window": label},
            }
        )
    sli_rules.append(
        {
            "record": f"slo:sli_error:ratio_rate{period}",
            "expr": (
                f"sum_over_time(slo:sli_error:ratio_rate5m{{{sel}}}[{period}])\n"
                f"/ ignoring (sloth_window)\n"
                f"count_over_time(slo:sli_error:ratio_rate5m{{{sel}}}[{period}])\n"
            ),
            "labels": {**base, "sloth_window": period},
        }
    )
    on = "on(sloth_id, sloth_slo, sloth_service) group_left"
    meta = [
        {"record": "slo:objective:ratio", "expr": f"vector({slo.objective!r})", "labels": base},
        {
            "record": "slo:error_budget:ratio",
            "expr": f"vector(1-{slo.objective!r})",
            "labels": base,
        },
        {
            "record": "slo:time_period:days",
            "expr": f"vector({spec.period / burn.DAY:g})",
            "labels": base,
        },
        {
            "record": "slo:current_burn_rate:ratio",
            "expr": (
                f"slo:sli_error:ratio_rate5m{{{sel}}}\n/ {on}\nslo:error_budget:ratio{{{sel}}}\n"
            ),
            "labels": base,
        },
        {
            "record": "slo:period_burn_rate:ratio",
            "expr": (
                f"slo:sli_error:ratio_rate{period}{{{sel}}}\n/ {on}\n"
                f"slo:error_budget:ratio{{{sel}}}\n"
            ),
            "labels": base,
        },
        {
            "record": "slo:period_error_budget_remaining:ratio",
            "expr": f"1 - slo:period_burn_rate:ratio{{{sel}}}",
            "labels": base,
        },
        {
            "record": "sloth_slo_info",
            "expr": "vector(1)",
            "labels": {
                **base,
                "sloth_mode": "autoecoops",
                "sloth_spec": "prometheus/v1",
                "sloth_version": "autoecoops-autoops-v1",
                "sloth_objective": f"{slo.objective * 100:g}",
                "owner": slo.owner,
            },
        },
    ]
    alerts = []
    page_name, ticket_name = alert_names(slo)
    budget = f"{1 - slo.objective:.12g}"
    for name, severity, rows in (
        (page_name, "page", [r for r in spec.rows if r.page]),
        (ticket_name, "ticket", [r for r in spec.rows if not r.page]),
    ):
        if not rows or not spec.alerting:
            continue
        parts = []
        for r in rows:
            factor = f"{r.burn_rate:g}"
            s_, l_ = burn.window_label(r.short_window), burn.window_label(r.long_window)
            parts.append(
                "(\n"
                f"    max(slo:sli_error:ratio_rate{s_}{{{sel}}} > ({factor} * {budget})) without (sloth_window)\n"
                "    and\n"
                f"    max(slo:sli_error:ratio_rate{l_}{{{sel}}} > ({factor} * {budget})) without (sloth_window)\n"
                ")"
            )
        rule: dict[str, Any] = {
            "alert": name,
            "expr": "\nor\n".join(parts) + "\n",
            "labels": {"sloth_severity": severity, **dict(slo.labels)},
            "annotations": {
                "summary": "{{$labels.sloth_service}} {{$labels.sloth_slo}} SLO error budget burn rate is over expected.",
                "title": "(page) {{$labels.sloth_service}} {{$labels.sloth_slo}} SLO error budget burn rate is too fast."
                if severity == "page"
                else "(ticket) {{$labels.sloth_service}} {{$labels.sloth_slo}} SLO error budget burn rate is too fast.",
            },
        }
        if spec.min_firing:
            rule["keep_firing_for"] = burn.window_label(spec.min_firing)
        alerts.append(rule)
    groups: list[dict[str, Any]] = [
        {"name": f"sloth-slo-sli-recordings-{sid}", "rules": sli_rules},
        {"name": f"sloth-slo-meta-recordings-{sid}", "rules": meta},
    ]
    if alerts:
        groups.append({"name": f"sloth-slo-alerts-{sid}", "rules": alerts})
    return groups


class _Literal(str):
    """A string YAML writes as a block (``|``), as Sloth's files do."""


def _literal(dumper: yaml.SafeDumper, data: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def _blockify(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _blockify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_blockify(v) for v in obj]
    if isinstance(obj, str) and "\n" in obj:
        return _Literal(obj)
    return obj


def render(slos: Iterable[pb.Slo], now: float) -> str:
    """A Prometheus rule file for ``slos`` (those with a PROMETHEUS indicator)."""
    groups: list[dict[str, Any]] = []
    for slo in slos:
        if slo.indicator.source == pb.SLI_SOURCE_PROMETHEUS:
            groups += slo_groups(slo, now)
    out: str = yaml.dump(
        _blockify({"groups": groups}), Dumper=_Dumper, sort_keys=False, default_flow_style=False
    )
    return out
