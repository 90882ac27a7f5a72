"""event-bus logic without Redis: retry policy, names, delivery ids, settings."""

from __future__ import annotations

import itertools

import pytest
from google.protobuf import duration_pb2

from autoecoops.events.v1 import events_pb2
from autoecoops.kernel.event_bus.names import check_name, id_before, parse_stream_id
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.settings import EventBusSettings, Retention, parse_retention
from autoecoops.kernel.event_bus.tokens import DeliveryRef, DeliveryTokens, subject_tag
from autoecoops.kernel.mesh.errors import ConfigError, InvalidArgument


def test_backoff_grows_exponentially_within_jitter_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=1.0, multiplier=2.0, max_backoff=10.0, max_attempts=8)
    assert [policy.base_delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    for n, r in itertools.product(range(1, 7), (0.0, 0.25, 0.5, 0.999)):
        d = policy.delay(n, lambda r=r: r)
        base = policy.base_delay(n)
        assert 0.8 * base <= d <= min(1.2 * base, 10.0)
    # The two extremes of the jitter differ: retries of events that failed together spread out.
    assert policy.delay(2, lambda: 0.0) < policy.delay(2, lambda: 0.999)


def test_attempts_are_exhausted_at_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_policy_round_trips_through_the_group_hash_and_the_contract() -> None:
    policy = RetryPolicy(0.25, 3.0, 42.5, 7)
    assert RetryPolicy.from_fields(policy.to_fields()) == policy
    assert RetryPolicy.from_proto(policy.to_proto()) == policy
    assert RetryPolicy.from_proto(events_pb2.RetryPolicy()) == RetryPolicy()


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (events_pb2.RetryPolicy(multiplier=0.5), "retry_policy.multiplier"),
        (events_pb2.RetryPolicy(max_attempts=-1), "retry_policy.max_attempts"),
        (
            events_pb2.RetryPolicy(
                initial_backoff=duration_pb2.Duration(seconds=10),
                max_backoff=duration_pb2.Duration(seconds=1),
            ),
            "retry_policy.max_backoff",
        ),
        (
            events_pb2.RetryPolicy(initial_backoff=duration_pb2.Duration(seconds=-1)),
            "retry_policy.initial_backoff",
        ),
    ],
)
def test_a_bad_retry_policy_names_its_field(msg: events_pb2.RetryPolicy, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        RetryPolicy.from_proto(msg)
    assert field in [v.field for v in err.value.field_violations]


@pytest.mark.parametrize("name", ["billing", "svc-1.workers_a", "A" * 128])
def test_good_group_names_pass(name: str) -> None:
    assert check_name(name, "group", "consumer group") == name


@pytest.mark.parametrize(
    "name", ["", "*", "g*", "g?", "g[1]", "a:b", "{tag}", "has space", "-lead", "A" * 129, "é"]
)
def test_group_names_with_wildcards_or_separators_are_invalid(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_name(name, "group", "consumer group")
    assert err.value.field_violations[0].field == "group"


def test_stream_ids_parse_and_step_back() -> None:
    assert parse_stream_id("1700000000000-3", "x") == (1700000000000, 3)
    assert id_before(5, 3) == "5-2"
    assert id_before(5, 0) == f"4-{(1 << 64) - 1}"
    assert id_before(0, 0) == "0-0"
    for bad in ("", "12", "1-2-3", "a-1", "-1-0", f"{1 << 64}-0"):
        with pytest.raises(InvalidArgument):
            parse_stream_id(bad, "start_event_id")


def test_delivery_ids_round_trip_and_resist_tampering() -> None:
    tokens = DeliveryTokens(b"s" * 32)
    ref = DeliveryRef(
        "infra.sync", "g", "c-1", "1700000000000-7", 3, subject_tag("alice"), "ab" * 16
    )
    token = tokens.encode(ref)
    assert tokens.decode(token) == ref
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # Any flipped character, another secret, or garbage: not a delivery.
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert tokens.decode(flipped) is None
    assert DeliveryTokens(b"t" * 32).decode(token) is None
    assert tokens.decode("not-a-token") is None
    assert tokens.decode("") is None


def test_retention_spec_parses_per_topic_options() -> None:
    base = Retention(max_len=100, max_age=60)
    parsed = parse_retention("infra.sync=maxlen:10,maxage:5; memory.documents=acked", base, "X")
    assert parsed == {
        "infra.sync": Retention(10, 5.0, False),
        "memory.documents": Retention(100, 60, True),
    }
    for bad in ("infra.sync", "=maxlen:1", "t=maxlen:x", "t=ttl:5", "t=maxlen:0,maxage:0"):
        with pytest.raises(ConfigError) as err:
            parse_retention(bad, base, "AUTOECOOPS_EVENT_BUS_RETENTION")
        assert "AUTOECOOPS_EVENT_BUS_RETENTION" in str(err.value)


def test_settings_from_env_and_done_ttl_never_below_retention() -> None:
    s = EventBusSettings.from_env(
        {
            "AUTOECOOPS_EVENT_BUS_MAX_AGE_SECONDS": "864000",
            "AUTOECOOPS_EVENT_BUS_CONSUMER_DEDUP_SECONDS": "60",
            "AUTOECOOPS_EVENT_BUS_RETENTION": "infra.sync=maxage:30",
            "AUTOECOOPS_EVENT_BUS_AUDIT": "true",
        }
    )
    assert s.audit
    assert s.done_ttl("memory.documents") == 864000
    assert s.done_ttl("infra.sync") == 60
    with pytest.raises(ConfigError):
        EventBusSettings.from_env({"AUTOECOOPS_EVENT_BUS_MAX_BATCH": "0"})
    with pytest.raises(ConfigError):
        EventBusSettings.from_env(
            {"AUTOECOOPS_EVENT_BUS_MAX_LEN": "0", "AUTOECOOPS_EVENT_BUS_MAX_AGE_SECONDS": "0"}
        )
