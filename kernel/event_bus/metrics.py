"""Prometheus metrics of the event bus, per topic and consumer group.

Counters count what this process did (Prometheus sums the replicas); the
gauges mirror what Redis holds and are refreshed by GetTopicStats and, when
the metrics port is on, by a periodic refresh (service.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

if TYPE_CHECKING:
    from autoecoops.kernel.event_bus.store import TopicInfo

_TG = ["topic", "group"]

PUBLISHED = Counter(
    "autoecoops_events_published_total",
    "Events appended to a topic (duplicates excluded).",
    ["topic"],
)
DELIVERED = Counter("autoecoops_events_delivered_total", "Deliveries made, retries included.", _TG)
ACKED = Counter("autoecoops_events_acked_total", "Deliveries acknowledged.", _TG)
RETRIED = Counter("autoecoops_events_retried_total", "Deliveries that were retries.", _TG)
DEAD_LETTERED = Counter(
    "autoecoops_events_dead_lettered_total", "Events moved to the dead-letter queue.", _TG
)
DEDUPLICATED = Counter(
    "autoecoops_events_deduplicated_total",
    "Events acked without delivery because the group had processed their idempotency key.",
    _TG,
)
LOST = Counter(
    "autoecoops_events_expired_unsettled_total",
    "Events trimmed by retention before the group settled them.",
    _TG,
)
LENGTH = Gauge("autoecoops_events_stream_length", "Events held in a topic's stream.", ["topic"])
LAG = Gauge("autoecoops_events_group_lag", "Events of the topic the group has not read yet.", _TG)
PENDING = Gauge("autoecoops_events_group_pending", "Deliveries made and not yet settled.", _TG)
OLDEST_PENDING = Gauge(
    "autoecoops_events_group_oldest_pending_age_seconds",
    "Age of the oldest unsettled delivery's event.",
    _TG,
)
DEAD_LETTERS = Gauge("autoecoops_events_dead_letters", "Dead letters held, by group.", _TG)


def observe_topic(info: TopicInfo, now_ms: int) -> None:
    """Set the gauges of one topic from a fresh snapshot."""
    LENGTH.labels(info.name).set(info.length)
    for g in info.groups:
        LAG.labels(info.name, g.name).set(g.lag)
        PENDING.labels(info.name, g.name).set(g.pending)
        age = 0.0 if g.oldest_pending_ms is None else max(now_ms - g.oldest_pending_ms, 0) / 1000
        OLDEST_PENDING.labels(info.name, g.name).set(age)
        DEAD_LETTERS.labels(info.name, g.name).set(g.dead_letters)
