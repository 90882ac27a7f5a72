"""Config: defaults from the port table, and one clear line per bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.cluster import key_slot

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.redis import parse_cluster_url, service_base


def test_defaults_follow_the_port_table() -> None:
    cfg = MeshConfig.from_env({})
    assert cfg.port("auth-service") == 4001
    assert cfg.port("infra-manager") == 4005
    assert cfg.port("machine-ops") == 5003
    assert cfg.addr("memory-hub") == "127.0.0.1:4002"
    assert cfg.redis_url == ""
    assert cfg.data_dir == Path(".autoecoops")


def test_overrides_are_typed() -> None:
    cfg = MeshConfig.from_env(
        {
            "AUTOECOOPS_EVENT_BUS_PORT": "7003",
            "AUTOECOOPS_MEMORY_HUB_ADDR": "memory-hub.autoecops-core:4002",
            "AUTOECOOPS_HOST": "0.0.0.0",
            "REDIS_URL": "redis://redis:6379/2",
            "AUTOECOOPS_SHUTDOWN_GRACE_SECONDS": "2.5",
            "AUTOECOOPS_DATA_DIR": "/var/lib/autoecoops",
        }
    )
    assert cfg.port("event-bus") == 7003
    assert cfg.addr("memory-hub") == "memory-hub.autoecops-core:4002"
    # A server bound to every interface is dialled on loopback.
    assert cfg.addr("auth-service") == "127.0.0.1:4001"
    assert cfg.shutdown_grace == 2.5
    assert cfg.data_dir == Path("/var/lib/autoecoops")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AUTOECOOPS_AUTH_SERVICE_PORT": "http"}, "AUTOECOOPS_AUTH_SERVICE_PORT"),
        ({"AUTOECOOPS_AUTH_SERVICE_PORT": "70000"}, "AUTOECOOPS_AUTH_SERVICE_PORT"),
        ({"AUTOECOOPS_IAOPS_PORT": "0"}, "AUTOECOOPS_IAOPS_PORT"),
        ({"AUTOECOOPS_IAOPS_PORT": "4001"}, "AUTOECOOPS_*_PORT"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:99999"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:6379/zero"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://h:1,h:99999"}, "REDIS_URL"),
        ({"REDIS_URL": "redis+cluster://h:7000/2"}, "REDIS_URL"),
        ({"AUTOECOOPS_REDIS_WAIT_REPLICAS": "-1"}, "AUTOECOOPS_REDIS_WAIT_REPLICAS"),
        ({"AUTOECOOPS_REDIS_WAIT_TIMEOUT_MS": "0"}, "AUTOECOOPS_REDIS_WAIT_TIMEOUT_MS"),
        ({"AUTOECOOPS_MEMORY_HUB_ADDR": "nohostport"}, "AUTOECOOPS_MEMORY_HUB_ADDR"),
        ({"AUTOECOOPS_MAX_MESSAGE_BYTES": "12"}, "AUTOECOOPS_MAX_MESSAGE_BYTES"),
        ({"AUTOECOOPS_SHUTDOWN_GRACE_SECONDS": "soon"}, "AUTOECOOPS_SHUTDOWN_GRACE_SECONDS"),
        ({"AUTOECOOPS_LOG_LEVEL": "LOUD"}, "AUTOECOOPS_LOG_LEVEL"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as info:
        MeshConfig.from_env(env)
    message = str(info.value)
    assert message.startswith(variable)
    assert "\n" not in message


@pytest.mark.parametrize(
    ("addr", "target", "replicated"),
    [
        ("memory-hub:4002", "memory-hub:4002", False),
        ("127.0.0.1:5001,127.0.0.1:5011", "ipv4:127.0.0.1:5001,127.0.0.1:5011", True),
        (" localhost:5001 , 10.0.0.7:5001", "ipv4:127.0.0.1:5001,10.0.0.7:5001", True),
        ("[::1]:5001,[2001:db8::2]:5001", "ipv6:[::1]:5001,[2001:db8::2]:5001", True),
        ("dns:///memory-hub.autoecops-core:4002", "dns:///memory-hub.autoecops-core:4002", True),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1", True),
    ],
)
def test_an_address_may_name_several_replicas(addr: str, target: str, replicated: bool) -> None:
    cfg = MeshConfig.from_env({"AUTOECOOPS_MEMORY_HUB_ADDR": addr})
    assert cfg.addr("memory-hub") == target
    assert cfg.replicated("memory-hub") is replicated
    assert not cfg.replicated("auth-service")


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("a.example:1,b.example:1", "takes IP addresses; for names use"),
        ("127.0.0.1:1,[::1]:1", "not both"),
        ("127.0.0.1:1,", "an empty entry"),
        ("127.0.0.1:1,127.0.0.1:http", "is not host:port"),
        ("dns:///memory-hub", "is not host:port"),
    ],
)
def test_a_bad_replica_list_says_what_is_wrong(addr: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        MeshConfig.from_env({"AUTOECOOPS_MEMORY_HUB_ADDR": addr})
    assert str(info.value).startswith("AUTOECOOPS_MEMORY_HUB_ADDR=")
    assert why in str(info.value)


def test_replicas_get_round_robin_health_checks_and_retries_of_idempotent_methods() -> None:
    import json

    from autoecoops.kernel.mesh.clients import idempotent_methods_of
    from autoecoops.kernel.mesh.config import replica_service_config

    methods = idempotent_methods_of("auth-service")
    config = json.loads(replica_service_config(methods))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    (retry,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in retry["name"]}
    # The contract's idempotent flag decides: GetRole is, CreateRole and IssueToken are not.
    assert ("autoecoops.auth.v1.AuthService", "GetRole") in names
    assert ("autoecoops.auth.v1.AuthService", "CreateRole") not in names
    assert ("autoecoops.auth.v1.AuthService", "IssueToken") not in names
    assert retry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    # policy-audit serves two packages; both are covered.
    services = {s for s, _ in idempotent_methods_of("policy-audit")}
    assert {"autoecoops.policy.v1.PolicyService", "autoecoops.audit.v1.AuditService"} <= services


def test_a_cluster_url_lists_seed_nodes_and_turns_replica_waits_on() -> None:
    url = "redis+cluster://app:s%3Acret@10.0.0.1:7000,redis-b:7001,redis-c"
    cfg = MeshConfig.from_env({"REDIS_URL": url})
    assert cfg.redis_cluster and cfg.wait_replicas == 1
    parsed = parse_cluster_url(url)
    assert parsed.nodes == (("10.0.0.1", 7000), ("redis-b", 7001), ("redis-c", 6379))
    assert (parsed.username, parsed.password, parsed.tls) == ("app", "s:cret", False)
    assert parse_cluster_url("rediss+cluster://h:1/0").tls
    # One Redis: no waiting unless asked; the setting wins over the default either way.
    assert MeshConfig.from_env({"REDIS_URL": "redis://h:6379/0"}).wait_replicas == 0
    env = {"REDIS_URL": url, "AUTOECOOPS_REDIS_WAIT_REPLICAS": "0"}
    assert MeshConfig.from_env(env).wait_replicas == 0


def test_on_a_cluster_a_service_s_keys_share_its_hash_tag() -> None:
    assert service_base("autoecoops:", "auth", cluster=False) == "autoecoops:auth"
    assert service_base("autoecoops:", "memory-hub", cluster=True) == "autoecoops:{memory-hub}"
    # auth-service's store is "auth": its keys join auth-service's outbox in one slot.
    assert service_base("autoecoops:", "auth", cluster=True) == "autoecoops:{auth-service}:auth"
    roles = service_base("a:", "auth", cluster=True) + ":roles"
    outbox = service_base("a:", "auth-service", cluster=True) + ":outbox"
    assert key_slot(roles.encode()) == key_slot(outbox.encode())
    # The first {...} is the tag: a store's own tags further on do not split a service.
    key = service_base("t:", "policy-audit", cluster=True) + ":{audit}:head"
    outbox = service_base("t:", "policy-audit", cluster=True) + ":outbox"
    assert key_slot(key.encode()) == key_slot(outbox.encode())


def test_secrets_may_come_from_files_named_by_a_file_variable(tmp_path: Path) -> None:
    from autoecoops.kernel.mesh.config import read_secret

    url = tmp_path / "redis-url"
    url.write_text("redis://10.0.0.9:6379/2\n")
    cfg = MeshConfig.from_env({"REDIS_URL_FILE": str(url)})
    assert cfg.redis_url == "redis://10.0.0.9:6379/2"
    assert read_secret({"X": " direct "}, "X") == "direct"
    assert read_secret({}, "X") == ""
    with pytest.raises(ConfigError) as both:
        read_secret({"X": "a", "X_FILE": str(url)}, "X")
    assert "both set" in str(both.value)
    with pytest.raises(ConfigError) as missing:
        MeshConfig.from_env({"REDIS_URL_FILE": str(tmp_path / "nope")})
    assert str(missing.value).startswith("REDIS_URL_FILE=")
    # What is in the file is checked like the variable itself.
    url.write_text("http://nope")
    with pytest.raises(ConfigError):
        MeshConfig.from_env({"REDIS_URL_FILE": str(url)})
