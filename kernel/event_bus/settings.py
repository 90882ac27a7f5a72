"""event-bus settings, read with the mesh's one config loader (``AUTOECOOPS_EVENT_BUS_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from autoecoops.kernel.mesh.config import read_bool, read_int, read_seconds, read_str
from autoecoops.kernel.mesh.errors import ConfigError

P = "AUTOECOOPS_EVENT_BUS_"
DAY = 86400.0
#: The hard ceiling on a topic's partitions: a subscription reads every
#: partition of its topic, so each is a stream it polls.
MAX_PARTITIONS = 1024


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a topic's stream keeps events: whichever bound is hit first.

    Trimming is approximate (whole stream nodes of up to 100 entries), as
    Redis's ``~`` trimming is; an event is never kept for less than the bound.
    """

    #: The most events kept; 0 means no bound by length.
    max_len: int = 1_000_000
    #: The longest an event is kept, in seconds; 0 means no bound by age.
    max_age: float = 7 * DAY
    #: Also delete events as soon as every consumer group has settled them,
    #: for topics that need no replay of processed events.
    trim_acked: bool = False


@dataclass(frozen=True, slots=True)
class EventBusSettings:
    """Limits, retention and defaults of the event bus."""

    #: Largest envelope, serialized (``AUTOECOOPS_EVENT_BUS_MAX_EVENT_BYTES``).
    max_event_bytes: int = 256 * 1024
    #: Most envelopes in one PublishBatch (``AUTOECOOPS_EVENT_BUS_MAX_BATCH``).
    max_batch: int = 500
    #: How long a producer's idempotency key is remembered
    #: (``AUTOECOOPS_EVENT_BUS_DEDUP_WINDOW_SECONDS``).
    dedup_window: float = DAY
    #: How long a group remembers that it processed an idempotency key; never
    #: less than the topic's retention age (``AUTOECOOPS_EVENT_BUS_CONSUMER_DEDUP_SECONDS``).
    consumer_dedup_ttl: float = 7 * DAY
    #: Retention of topics without their own (``AUTOECOOPS_EVENT_BUS_MAX_LEN``,
    #: ``AUTOECOOPS_EVENT_BUS_MAX_AGE_SECONDS``).
    retention: Retention = field(default_factory=Retention)
    #: Per-topic retention (``AUTOECOOPS_EVENT_BUS_RETENTION``, see ``parse_retention``).
    topic_retention: Mapping[str, Retention] = field(default_factory=dict)
    #: Most dead letters kept per topic; the oldest go first
    #: (``AUTOECOOPS_EVENT_BUS_DLQ_MAX_LEN``).
    dlq_max_len: int = 100_000
    #: Lease of a delivery when the subscriber names none
    #: (``AUTOECOOPS_EVENT_BUS_VISIBILITY_TIMEOUT_SECONDS``).
    visibility_timeout: float = 30.0
    #: Unsettled deliveries per consumer when the subscriber names none.
    max_in_flight: int = 16
    #: The most a subscriber may ask for (``AUTOECOOPS_EVENT_BUS_MAX_IN_FLIGHT_LIMIT``).
    max_in_flight_limit: int = 1000
    #: How often an idle subscription looks for acks made on other replicas and
    #: for retries that fell due (``AUTOECOOPS_EVENT_BUS_POLL_SECONDS``).
    poll_interval: float = 0.5
    #: Write every processing outcome to policy-audit (``AUTOECOOPS_EVENT_BUS_AUDIT``).
    audit: bool = True
    #: Seconds between refreshes of the Prometheus gauges when metrics are on
    #: (``AUTOECOOPS_EVENT_BUS_METRICS_INTERVAL_SECONDS``).
    metrics_interval: float = 15.0
    #: Partitions of a topic set up without CreateTopic, fixed when it is first
    #: written to (``AUTOECOOPS_EVENT_BUS_PARTITIONS``; 1: one stream, as before).
    partitions: int = 1
    #: The most partitions a topic may have (``AUTOECOOPS_EVENT_BUS_MAX_PARTITIONS``).
    max_partitions: int = 64

    def retention_for(self, topic: str) -> Retention:
        """The retention of ``topic``."""
        return self.topic_retention.get(topic, self.retention)

    def done_ttl(self, topic: str) -> float:
        """How long a group's "processed" mark lives: at least the retention age,
        so a replayed or reclaimed event still inside retention is recognised."""
        return max(self.consumer_dedup_ttl, self.retention_for(topic).max_age)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EventBusSettings:
        """Read and validate ``AUTOECOOPS_EVENT_BUS_*``."""
        env = os.environ if env is None else env
        d = cls()
        default_retention = Retention(
            max_len=read_int(env, f"{P}MAX_LEN", d.retention.max_len, 0, 1 << 40),
            max_age=read_seconds(env, f"{P}MAX_AGE_SECONDS", d.retention.max_age, hi=365 * DAY),
        )
        if not default_retention.max_len and not default_retention.max_age:
            raise ConfigError(f"{P}MAX_LEN and {P}MAX_AGE_SECONDS: at least one must bound a topic")
        limit = read_int(env, f"{P}MAX_IN_FLIGHT_LIMIT", d.max_in_flight_limit, 1, 100_000)
        max_partitions = read_int(env, f"{P}MAX_PARTITIONS", d.max_partitions, 1, MAX_PARTITIONS)
        partitions = read_int(env, f"{P}PARTITIONS", d.partitions, 1, MAX_PARTITIONS)
        if partitions > max_partitions:
            raise ConfigError(
                f"{P}PARTITIONS={partitions}: more than {P}MAX_PARTITIONS={max_partitions}"
            )
        return cls(
            max_event_bytes=read_int(env, f"{P}MAX_EVENT_BYTES", d.max_event_bytes, 256, 64 << 20),
            max_batch=read_int(env, f"{P}MAX_BATCH", d.max_batch, 1, 100_000),
            dedup_window=read_seconds(env, f"{P}DEDUP_WINDOW_SECONDS", d.dedup_window, hi=30 * DAY),
            consumer_dedup_ttl=read_seconds(
                env, f"{P}CONSUMER_DEDUP_SECONDS", d.consumer_dedup_ttl, hi=365 * DAY
            ),
            retention=default_retention,
            topic_retention=parse_retention(
                read_str(env, f"{P}RETENTION", ""), default_retention, f"{P}RETENTION"
            ),
            dlq_max_len=read_int(env, f"{P}DLQ_MAX_LEN", d.dlq_max_len, 1, 1 << 40),
            visibility_timeout=_positive(
                env, f"{P}VISIBILITY_TIMEOUT_SECONDS", d.visibility_timeout, 12 * 3600
            ),
            max_in_flight=min(d.max_in_flight, limit),
            max_in_flight_limit=limit,
            poll_interval=_positive(env, f"{P}POLL_SECONDS", d.poll_interval, 60),
            audit=read_bool(env, f"{P}AUDIT", d.audit),
            metrics_interval=_positive(
                env, f"{P}METRICS_INTERVAL_SECONDS", d.metrics_interval, 3600
            ),
            partitions=partitions,
            max_partitions=max_partitions,
        )


def _positive(env: Mapping[str, str], name: str, default: float, hi: float) -> float:
    value = read_seconds(env, name, default, hi=hi)
    if value <= 0:
        raise ConfigError(f"{name}={value}: must be more than 0 seconds")
    return value


def parse_retention(spec: str, base: Retention, name: str) -> dict[str, Retention]:
    """Parse per-topic retention: ``TOPIC=OPT[,OPT...][;TOPIC=...]``.

    An OPT is ``maxlen:N``, ``maxage:SECONDS`` or ``acked`` (trim settled
    events); options not given keep the defaults. Example:
    ``infra.sync=maxlen:10000,maxage:3600;memory.documents=acked``.
    """
    out: dict[str, Retention] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        topic, sep, opts = part.partition("=")
        topic = topic.strip()
        if not sep or not topic:
            raise ConfigError(f"{name}: {part!r} is not TOPIC=OPTIONS")
        max_len, max_age, acked = base.max_len, base.max_age, base.trim_acked
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            key, _, value = opt.partition(":")
            try:
                if key == "maxlen":
                    max_len = int(value)
                elif key == "maxage":
                    max_age = float(value)
                elif key == "acked" and not value:
                    acked = True
                else:
                    raise ValueError(opt)
            except ValueError:
                raise ConfigError(
                    f"{name}: {topic}: bad option {opt!r} (maxlen:N, maxage:SECONDS or acked)"
                ) from None
        if max_len < 0 or max_age < 0 or not (max_len or max_age):
            raise ConfigError(f"{name}: {topic}: maxlen and maxage must be >= 0 and one > 0")
        out[topic] = Retention(max_len=max_len, max_age=max_age, trim_acked=acked)
    return out
