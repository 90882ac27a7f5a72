"""Where each service is and how the client connects to it.

A client reaches every service at its own address (``AUTOECOOPS_<SERVICE>_ADDR``
or the port table, via ``MeshConfig``), or all of them at one ``target`` (an
ingress or proxy that routes by gRPC service). An address may name several
replicas: a list ``ip:port,ip:port`` or a DNS name ``dns:///name:port`` with a
record per replica; the channel then spreads calls round robin over the
replicas whose grpc.health.v1 status is SERVING, and the SDK's retry of an
idempotent call is picked anew, so it goes to another replica. Channels use TLS except to a
loopback address, unless told otherwise; and a bearer token never travels in
clear text beyond loopback unless the caller says so explicitly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from autoecoops.kernel.mesh.config import (
    DOMAIN_SERVICE,
    MeshConfig,
    dial_target,
    is_replica_set,
    replica_options,
)
from autoecoops.kernel.mesh.config import channel_options as mesh_channel_options
from autoecoops.kernel.mesh.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TLS:
    """TLS for the client's channels; all fields optional."""

    #: PEM roots to verify servers with; None uses the system's.
    root_certificates: bytes | None = None
    #: PEM private key and certificate chain, for mutual TLS.
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    #: The name expected in the server certificate, when it is not the host dialled.
    server_name: str = ""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials of these settings."""
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def host_of(target: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, ``dns:///host:port`` or a unix: target."""
    if target.startswith(("unix:", "unix-abstract:")):
        return "unix"
    if "://" in target:
        target = target.split("://", 1)[1].lstrip("/")
    elif target.startswith("dns:"):
        target = target[4:]
    if target.startswith("["):
        return target[1 : target.find("]")]
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def hosts_of(target: str) -> list[str]:
    """The hosts of ``target``; several for a list of replicas (``ipv4:a:1,b:2``)."""
    if target.startswith(("ipv4:", "ipv6:")):
        target = target[5:]
    if target.startswith("//"):
        target = target[2:].partition("/")[2]
    return [host_of(entry) for entry in target.split(",")]


def is_loopback(target: str) -> bool:
    """True when ``target`` cannot leave this machine (every replica of a list is local)."""
    return all(_loopback_host(host) for host in hosts_of(target))


def _loopback_host(host: str) -> bool:
    if host in {"unix", "localhost"} or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_for(target: str, tls: bool | TLS | None) -> TLS | None:
    """The TLS settings for ``target``: None (plaintext) or the settings to use.

    ``tls=None`` means TLS except to loopback, where a local mesh listens in
    plaintext.
    """
    if isinstance(tls, TLS):
        return tls
    if tls is None:
        return None if is_loopback(target) else TLS()
    return TLS() if tls else None


def check_credentials(target: str, tls: TLS | None, allow_insecure: bool) -> None:
    """Refuse to send a bearer token in clear text beyond loopback."""
    if tls is None and not allow_insecure and not is_loopback(target):
        raise ConfigError(
            f"{target}: credentials would be sent without TLS to a non-loopback address; "
            "use tls=True (or TLS(...)), or pass allow_insecure_credentials=True"
        )


def channel_options(
    config: MeshConfig,
    tls: TLS | None,
    extra: Sequence[tuple[str, Any]] = (),
    target: str = "",
) -> list[tuple[str, Any]]:
    """Channel arguments: message limits from the mesh config, keepalive, the
    replica policy when ``target`` names several replicas, then ``extra``."""
    options: dict[str, Any] = dict(mesh_channel_options(config))
    # The SDK retries itself, by the contract's idempotent flag; gRPC's own
    # retries (transparent ones aside) would retry the rest too.
    options["grpc.enable_retries"] = 0
    if target and is_replica_set(target):
        # Round robin over the healthy replicas; no retry policy, as above.
        options.update(dict(replica_options()))
    if tls is not None and tls.server_name:
        options["grpc.ssl_target_name_override"] = tls.server_name
    options.update(dict(extra))
    return list(options.items())


class Routes:
    """The address of each service: ``addresses``, else ``target``, else the mesh config."""

    def __init__(
        self,
        target: str | Sequence[str] | None,
        addresses: Mapping[str, str | Sequence[str]] | None,
        config: MeshConfig,
    ) -> None:
        self._target = target
        self._addresses = dict(addresses or {})
        self._config = config

    def address(self, service: str) -> str:
        """Where to dial the proto service ``service`` (``package.Service``).

        ``addresses`` may name it by its full name or by its mesh service name
        (``memory-hub``).
        """
        if service in self._addresses:
            return target_of(self._addresses[service])
        mesh = mesh_service(service)
        if mesh is not None and mesh in self._addresses:
            return target_of(self._addresses[mesh])
        if self._target:
            return target_of(self._target)
        if mesh is not None:
            return self._config.addr(mesh)
        raise ConfigError(
            f"no address for {service}: it is not in the mesh's port table; "
            f"pass target=... or addresses={{{service!r}: 'host:port'}}"
        )


def target_of(address: str | Sequence[str]) -> str:
    """The gRPC target of an address the caller gave: ``host:port``, a list of
    replicas (a sequence, or ``ip:port,ip:port``) or ``dns:///name:port``."""
    joined = address if isinstance(address, str) else ",".join(address)
    # One address passes through as gRPC takes it (host:port, dns:, unix:...).
    try:
        return dial_target(joined) if "," in joined else joined
    except ValueError as err:
        raise ConfigError(f"address {joined!r}: {err}") from None


def mesh_service(service: str) -> str | None:
    """The mesh service that serves proto service ``autoecoops.<domain>.v1.X``."""
    parts = service.split(".")
    if len(parts) >= 3 and parts[0] == "autoecoops":
        return DOMAIN_SERVICE.get(parts[1])
    return None
