"""Where SLI events come from: pushed buckets, a Prometheus server, the mesh's own metrics."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.errors import FailedPrecondition, Unavailable
from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.store import COARSE, FINE

log = logging.getLogger("autoecoops.autoops")

#: gRPC codes that count against availability: the server's fault, not the caller's.
SERVER_ERRORS = frozenset(
    {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNIMPLEMENTED"}
)


#: One tier's buckets as Redis HMGET returns them for a window: (goods, totals),
#: oldest first, the current bucket last, missing buckets 0.
Dense = tuple[list[int], list[int]]


def split_windows(
    windows: Sequence[float], fine_keep: float, fine_size: int = FINE
) -> tuple[list[float], int, list[float], int]:
    """(fine windows, fine buckets needed, coarse windows, coarse buckets needed).

    Windows up to ``fine_keep`` read minute buckets; longer ones hour buckets
    (the current, partial hour included).
    """
    short = [w for w in windows if w <= fine_keep]
    long = [w for w in windows if w > fine_keep]
    fine_span = max((math.ceil(w / fine_size) for w in short), default=0)
    coarse_span = max((math.ceil(w / COARSE) for w in long), default=0)
    return short, fine_span, long, coarse_span


def window_counts(
    fine: Dense,
    coarse: Dense,
    windows: Sequence[float],
    fine_keep: float,
    fine_size: int = FINE,
) -> dict[float, burn.Counts]:
    """Good/total over each window ending now, from each tier's dense buckets.

    The tiers come from Redis already laid out (HMGET of exactly the buckets
    the longest window needs), so every window is a C-level ``sum`` over a
    slice and nothing is looped over in Python.
    """
    out: dict[float, burn.Counts] = {}
    short, _, long, _ = split_windows(windows, fine_keep, fine_size)
    for (goods, totals), size, group in ((fine, fine_size, short), (coarse, COARSE, long)):
        for w in group:
            k = math.ceil(w / size)
            out[w] = burn.Counts(float(sum(goods[-k:])), float(sum(totals[-k:])))
    return out


def dense(buckets: Mapping[int, tuple[int, int]], last: int, span: int) -> Dense:
    """A tier's ``bucket -> (good, total)`` mapping laid out like HMGET's answer."""
    first = last - span + 1
    rows = [buckets.get(b, (0, 0)) for b in range(first, last + 1)]
    return [g for g, _ in rows], [t for _, t in rows]


# -- Prometheus ---------------------------------------------------------------


def prom_duration(seconds: float) -> str:
    """A PromQL range for ``seconds``."""
    return burn.window_label(seconds)


def _selector(metric: str, suffix: str, extra: str = "") -> str:
    """``name_suffix{labels,extra}`` from ``name{labels}``."""
    m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?$", metric.strip())
    if not m:
        raise FailedPrecondition(
            f"{metric!r} is not a metric selector (name{{labels}})", reason="INVALID_METRIC"
        )
    labels = ",".join(p for p in ((m.group(3) or "").strip(), extra) if p)
    return f"{m.group(1)}{suffix}{{{labels}}}" if labels else f"{m.group(1)}{suffix}"


def le_matcher(threshold: float) -> str:
    """An ``le`` matcher for a bucket bound, as Go ("1") and Python ("1.0") clients write it."""
    value = float(threshold)
    if value.is_integer():
        return f'le=~"{int(value)}|{int(value)}.0"'
    return f'le="{value!r}"'


def prom_queries(ind: pb.Indicator, window: str) -> tuple[str, str, bool]:
    """(events query, total query, events-are-good) of an indicator over ``window``."""
    kind = ind.WhichOneof("kind")
    if kind == "ratio":
        r = ind.ratio
        events = r.good or r.bad
        return (
            f"sum(increase({events}[{window}]))",
            f"sum(increase({r.total}[{window}]))",
            bool(r.good),
        )
    t = ind.threshold
    good = _selector(t.metric, "_bucket", le_matcher(t.threshold.ToNanoseconds() / 1e9))
    total = _selector(t.metric, "_count")
    return f"sum(increase({good}[{window}]))", f"sum(increase({total}[{window}]))", True


class PrometheusClient:
    """Instant queries against a Prometheus server's HTTP API."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        """Close the HTTP pool."""
        await self._http.aclose()

    async def query(self, promql: str, at: float | None = None) -> list[dict[str, object]]:
        """The result vector of an instant query; UNAVAILABLE when the server is not."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            reply = await self._http.get(f"{self.url}/api/v1/query", params=params)
        except httpx.HTTPError as err:
            raise Unavailable(
                f"Prometheus at {self.url} is unreachable: {err}", reason="PROMETHEUS_UNAVAILABLE"
            ) from None
        body = (
            reply.json()
            if reply.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        if reply.status_code != 200 or body.get("status") != "success":
            raise FailedPrecondition(
                f"Prometheus rejected {promql!r}: {body.get('error', reply.text[:200])}",
                reason="PROMQL_ERROR",
            )
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    async def scalar(self, promql: str, at: float | None = None) -> float:
        """The first sample's value (0 for an empty result; NaN counts as 0)."""
        result = await self.query(promql, at)
        if not result:
            return 0.0
        value = float(result[0]["value"][1])  # type: ignore[index]
        return 0.0 if math.isnan(value) else value

    async def counts(
        self, ind: pb.Indicator, windows: Iterable[float], at: float | None = None
    ) -> dict[float, burn.Counts]:
        """Good/total over each window, from increase() of the indicator's counters."""
        out = {}
        for w in windows:
            events_q, total_q, good = prom_queries(ind, prom_duration(w))
            events = await self.scalar(events_q, at)
            total = await self.scalar(total_q, at)
            out[w] = burn.Counts(events if good else max(total - events, 0.0), total)
        return out


# -- the mesh's own metrics ----------------------------------------------------


@dataclass
class MeshSampler:
    """Turns the process's RPC counters into per-tick deltas for MESH SLOs.

    ``autoecoops up`` runs every service in one process, so the platform reads
    the same prometheus_client registry the interceptor writes; the deltas go
    into the SLO's buckets like pushed samples.
    """

    _last: dict[str, tuple[float, float]] = field(default_factory=dict)

    @staticmethod
    def totals(ind: pb.Indicator) -> tuple[float, float]:
        """(good, total) calls since start for the indicator's selector."""
        from autoecoops.kernel.mesh.metrics import HANDLED, LATENCY

        sel = ind.mesh
        good = total = 0.0
        if ind.WhichOneof("kind") == "threshold":
            bound = ind.threshold.threshold.ToNanoseconds() / 1e9
            for metric in LATENCY.collect():
                for s in metric.samples:
                    labels = s.labels
                    if labels.get("grpc_service") != sel.grpc_service:
                        continue
                    if sel.grpc_method and labels.get("grpc_method") != sel.grpc_method:
                        continue
                    if s.name.endswith("_count"):
                        total += s.value
                    elif s.name.endswith("_bucket") and float(labels["le"]) == _floor_bound(bound):
                        good += s.value
            return good, total
        for metric in HANDLED.collect():
            for s in metric.samples:
                if not s.name.endswith("_total"):
                    continue
                labels = s.labels
                if labels.get("grpc_service") != sel.grpc_service:
                    continue
                if sel.grpc_method and labels.get("grpc_method") != sel.grpc_method:
                    continue
                total += s.value
                if labels.get("grpc_code") not in SERVER_ERRORS:
                    good += s.value
        return good, total

    def delta(self, slo: str, ind: pb.Indicator) -> tuple[int, int]:
        """New (good, total) calls since the last call for ``slo``."""
        good, total = self.totals(ind)
        last_good, last_total = self._last.get(slo, (good, total))
        self._last[slo] = (good, total)
        if total < last_total:  # a restart reset the counters
            return int(good), int(total)
        return int(good - last_good), int(total - last_total)


def _floor_bound(bound: float) -> float:
    """The histogram bucket bound the threshold falls on (the largest bound <= it)."""
    from autoecoops.kernel.mesh.metrics import LATENCY

    bounds = [b for b in LATENCY._upper_bounds if b <= bound]
    return bounds[-1] if bounds else LATENCY._upper_bounds[0]
