"""Addresses, TLS defaults and the rule that credentials need TLS beyond loopback."""

from __future__ import annotations

import re

import pytest

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.sdk.channels import TLS, Routes, check_credentials, is_loopback, tls_for

MEMORY = "autoecoops.memory.v1.MemoryService"


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:4002", True),
        ("127.9.9.9:1", True),
        ("localhost:4002", True),
        ("[::1]:4002", True),
        ("unix:///run/mesh.sock", True),
        ("dns:///localhost:4002", True),
        ("10.0.0.5:4002", False),
        ("memory-hub.autoecops-core:4002", False),
        ("[2001:db8::1]:443", False),
        ("localhost.evil.example:443", False),
    ],
)
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def test_tls_unless_loopback_by_default() -> None:
    assert tls_for("127.0.0.1:4002", None) is None
    assert tls_for("mesh.example.com:443", None) == TLS()
    assert tls_for("127.0.0.1:4002", True) == TLS()
    assert tls_for("mesh.example.com:443", False) is None
    custom = TLS(server_name="mesh.internal")
    assert tls_for("10.0.0.1:443", custom) is custom


def test_credentials_need_tls_beyond_loopback() -> None:
    check_credentials("127.0.0.1:4002", None, allow_insecure=False)
    check_credentials("mesh.example.com:443", TLS(), allow_insecure=False)
    check_credentials("10.0.0.5:4002", None, allow_insecure=True)
    with pytest.raises(ConfigError, match=re.escape("10.0.0.5:4002")):
        check_credentials("10.0.0.5:4002", None, allow_insecure=False)


def test_addresses_come_from_arguments_then_target_then_the_mesh_config() -> None:
    config = MeshConfig.from_env({"AUTOECOOPS_MEMORY_HUB_ADDR": "memory.svc:4002"})
    assert Routes(None, None, config).address(MEMORY) == "memory.svc:4002"
    assert Routes(None, None, config).address("autoecoops.auth.v1.AuthService") == "127.0.0.1:4001"
    assert Routes("ingress:443", None, config).address(MEMORY) == "ingress:443"
    by_mesh_name = Routes("ingress:443", {"memory-hub": "m:1"}, config)
    assert by_mesh_name.address(MEMORY) == "m:1"
    by_proto_name = Routes(None, {MEMORY: "m:2"}, config)
    assert by_proto_name.address(MEMORY) == "m:2"
    with pytest.raises(ConfigError, match=re.escape("no address for acme.v1.Thing")):
        Routes(None, None, config).address("acme.v1.Thing")


def test_an_address_may_list_replicas() -> None:
    cfg = MeshConfig()
    routes = Routes(
        None,
        {"memory-hub": ["127.0.0.1:1", "127.0.0.1:2"], "auth-service": "dns:///auth:4001"},
        cfg,
    )
    assert routes.address(MEMORY) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert routes.address("autoecoops.auth.v1.AuthService") == "dns:///auth:4001"
    # Every replica of a list must be local for the list to count as loopback.
    assert is_loopback("ipv4:127.0.0.1:1,127.0.0.2:2")
    assert not is_loopback("ipv4:127.0.0.1:1,10.0.0.2:2")
    with pytest.raises(ConfigError, match="takes IP addresses"):
        Routes(None, {"memory-hub": "a:1,b:2"}, cfg).address(MEMORY)
