"""The gateway's settings, from ``AUTOECOOPS_GATEWAY_*`` variables.

Read with the mesh's typed readers (kernel/mesh/config.py), validated once at
start: a bad value raises ``ConfigError`` naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autoecoops.kernel.mesh.config import (
    PREFIX,
    read_bool,
    read_int,
    read_port,
    read_seconds,
    read_str,
)
from autoecoops.kernel.mesh.errors import ConfigError

ENV = f"{PREFIX}GATEWAY_"
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How the REST gateway listens, what it accepts and whom it lets in."""

    #: HTTP port (``AUTOECOOPS_GATEWAY_PORT``); 0 picks a free one.
    port: int = 8080
    #: Largest request body in bytes; larger is 413 before any backend call
    #: (``AUTOECOOPS_GATEWAY_MAX_BODY_BYTES``).
    max_body_bytes: int = 4 * 1024 * 1024
    #: Origins allowed by CORS, e.g. ``https://console.example.com``; ``*`` is
    #: any origin; empty turns CORS off (``AUTOECOOPS_GATEWAY_CORS_ORIGINS``,
    #: comma-separated).
    cors_origins: tuple[str, ...] = ()
    #: Whether browsers may send cookies/credentials cross-origin
    #: (``AUTOECOOPS_GATEWAY_CORS_ALLOW_CREDENTIALS``); not with ``*``.
    cors_allow_credentials: bool = False
    #: Seconds a browser may cache a preflight (``AUTOECOOPS_GATEWAY_CORS_MAX_AGE_SECONDS``).
    cors_max_age: int = 600
    #: Deadline of a unary call when the client sends no ``Grpc-Timeout`` or
    #: ``X-Request-Timeout`` (``AUTOECOOPS_GATEWAY_TIMEOUT_SECONDS``). Streams
    #: have none unless the client asks.
    default_timeout: float = 30.0
    #: The longest deadline a client may ask for (``AUTOECOOPS_GATEWAY_MAX_TIMEOUT_SECONDS``).
    max_timeout: float = 3600.0
    #: Per-backend timeout of ``/healthz`` (``AUTOECOOPS_GATEWAY_HEALTH_TIMEOUT_SECONDS``).
    health_timeout: float = 2.0
    #: Seconds between SSE keep-alive comments on an idle stream
    #: (``AUTOECOOPS_GATEWAY_SSE_KEEPALIVE_SECONDS``).
    sse_keepalive: float = 15.0
    #: The OpenAPI document to serve (``AUTOECOOPS_GATEWAY_OPENAPI_FILE``);
    #: empty means gen/openapi/openapi.json of this checkout, else one built at start.
    openapi_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Read and validate the settings; raise ``ConfigError`` naming a bad variable."""
        env = os.environ if env is None else env
        d = cls()
        origins = tuple(
            o.strip().rstrip("/") for o in env.get(f"{ENV}CORS_ORIGINS", "").split(",") if o.strip()
        )
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ConfigError(
                    f"{ENV}CORS_ORIGINS: {origin!r} is not '*' or scheme://host[:port]"
                )
        credentials = read_bool(env, f"{ENV}CORS_ALLOW_CREDENTIALS", d.cors_allow_credentials)
        if credentials and "*" in origins:
            raise ConfigError(
                f"{ENV}CORS_ALLOW_CREDENTIALS: browsers refuse credentials with origin '*'; "
                "list the origins"
            )
        port = env.get(f"{ENV}PORT", "").strip()
        return cls(
            port=0 if port == "0" else read_port(env, f"{ENV}PORT", d.port),
            max_body_bytes=read_int(env, f"{ENV}MAX_BODY_BYTES", d.max_body_bytes, 1, 1 << 30),
            cors_origins=origins,
            cors_allow_credentials=credentials,
            cors_max_age=read_int(env, f"{ENV}CORS_MAX_AGE_SECONDS", d.cors_max_age, 0, 86400),
            default_timeout=read_seconds(env, f"{ENV}TIMEOUT_SECONDS", d.default_timeout, 86400),
            max_timeout=read_seconds(env, f"{ENV}MAX_TIMEOUT_SECONDS", d.max_timeout, 86400),
            health_timeout=read_seconds(env, f"{ENV}HEALTH_TIMEOUT_SECONDS", d.health_timeout, 60),
            sse_keepalive=read_seconds(env, f"{ENV}SSE_KEEPALIVE_SECONDS", d.sse_keepalive, 3600),
            openapi_file=read_str(env, f"{ENV}OPENAPI_FILE", d.openapi_file),
        )
