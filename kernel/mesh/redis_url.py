"""``REDIS_URL`` forms, parsed without the Redis client: the one config loader
(config.py) validates them, and clients that have no Redis (the SDK) import it.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import unquote, urlparse

__all__ = ["CLUSTER_SCHEMES", "ClusterURL", "is_cluster_url", "parse_cluster_url"]

#: The schemes of a cluster ``REDIS_URL``: seed nodes, comma-separated.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterURL:
    """A parsed ``redis+cluster://[user:password@]host:port,host:port[/0]``."""

    #: Seed nodes; the client discovers the others (and every failover) itself.
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """The seed nodes and credentials of a cluster URL; ``ValueError`` saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError("scheme must be redis+cluster:// or rediss+cluster://")
    # urlparse cannot split "h1:p1,h2:p2", so the node list is parsed here.
    netloc, _, path = rest.partition("/")
    if path.split("?", 1)[0] not in ("", "0"):
        raise ValueError("a cluster has database 0 only")
    creds, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        probe = urlparse(f"redis://{part}")
        try:
            port = probe.port or 6379
        except ValueError:
            raise ValueError(f"bad port in {part!r}") from None
        if not probe.hostname or not 0 < port < 65536:
            raise ValueError(f"expected host:port, got {part!r}")
        nodes.append((probe.hostname, port))
    if not nodes:
        raise ValueError("no seed node (expected redis+cluster://host:port,host:port)")
    return ClusterURL(tuple(nodes), username, password, scheme.lower() == "rediss+cluster")
