"""Config: defaults from the port table, and one clear line per bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError


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
