"""auth-service settings, read with the mesh's one config loader."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoecoops.kernel.mesh.config import (
    PREFIX,
    MeshConfig,
    _dial_host,
    read_bool,
    read_int,
    read_seconds,
    read_str,
)

P = "AUTOECOOPS_AUTH_"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Issuer, token and cache settings (``AUTOECOOPS_AUTH_*``)."""

    #: The ``iss`` of our tokens; the URL whose /.well-known/openid-configuration
    #: the gateway serves (``AUTOECOOPS_AUTH_ISSUER``; default: the gateway's
    #: own address, ``http://<AUTOECOOPS_HOST>:<AUTOECOOPS_GATEWAY_PORT>``).
    issuer: str = "http://127.0.0.1:8080"
    #: The mesh-wide audience; exchanged tokens may name one service instead.
    audience: str = "autoecoops"
    #: Lifetime of issued access tokens (``AUTOECOOPS_AUTH_TOKEN_TTL_SECONDS``).
    token_ttl: float = 900.0
    #: Longest lifetime `autoecoops token --ttl` may ask for; retired keys stay
    #: published this long (``AUTOECOOPS_AUTH_MAX_TOKEN_TTL_SECONDS``).
    max_token_ttl: float = 86400.0
    #: Clock skew accepted on exp/nbf/iat (``AUTOECOOPS_AUTH_LEEWAY_SECONDS``).
    leeway: float = 60.0
    #: How long fetched JWKS are trusted (``AUTOECOOPS_AUTH_JWKS_TTL_SECONDS``).
    jwks_ttl: float = 300.0
    #: Minimum time between refetches on an unknown kid (``AUTOECOOPS_AUTH_JWKS_COOLDOWN_SECONDS``).
    jwks_cooldown: float = 10.0
    #: Algorithm of generated signing keys (``AUTOECOOPS_AUTH_SIGNING_ALG``).
    signing_alg: str = "ES256"
    #: A PEM private key to sign with instead of a generated one (``AUTOECOOPS_AUTH_SIGNING_KEY_FILE``).
    key_file: Path | None = None
    #: Roles, bindings, service accounts and trusted issuers to seed at start (``AUTOECOOPS_AUTH_SEED_FILE``).
    seed_file: Path | None = None
    #: Entries of the verified-token cache (``AUTOECOOPS_AUTH_CACHE_SIZE``).
    cache_size: int = 10_000
    #: How long a call waits for the first RBAC snapshot before it is refused
    #: UNAVAILABLE (fail closed) (``AUTOECOOPS_AUTH_RBAC_WAIT_SECONDS``).
    rbac_wait: float = 5.0
    #: Whether auth-service leaves client credentials in the data directory for
    #: services started apart from it on this machine
    #: (``AUTOECOOPS_AUTH_LOCAL_CLIENT``; default on, off where
    #: ``AUTOECOOPS_SERVICE_CLIENT_ID`` says identities come from Secrets).
    local_client: bool = True
    #: Where keys live: ``<data dir>/auth/keys``.
    key_dir: Path = Path(".autoecoops/auth/keys")

    @property
    def local_client_file(self) -> Path:
        """Client credentials a local auth-service leaves for services started apart
        from it on this machine (``autoecoops serve <service>`` sharing the data dir)."""
        return self.key_dir.parent / "mesh-client.json"

    def local_client_file_of(self, service: str) -> Path:
        """The local client file of ``service`` when it has roles of its own
        (``mesh-client.<service>.json``); the shared one for ""."""
        if not service:
            return self.local_client_file
        return self.key_dir.parent / f"mesh-client.{service}.json"

    @property
    def publish_delay(self) -> float:
        """A rotated key signs only after verifiers' JWKS caches have expired."""
        return self.jwks_ttl

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> AuthSettings:
        """Read and validate ``AUTOECOOPS_AUTH_*``."""
        env = os.environ if env is None else env
        d = cls()
        key_file = env.get(f"{P}SIGNING_KEY_FILE", "").strip()
        seed = env.get(f"{P}SEED_FILE", "").strip()
        return cls(
            issuer=read_str(env, f"{P}ISSUER", gateway_url(config, env)).rstrip("/"),
            audience=read_str(env, f"{P}AUDIENCE", d.audience),
            token_ttl=read_seconds(env, f"{P}TOKEN_TTL_SECONDS", d.token_ttl, hi=86400),
            max_token_ttl=read_seconds(
                env, f"{P}MAX_TOKEN_TTL_SECONDS", d.max_token_ttl, hi=30 * 86400
            ),
            leeway=read_seconds(env, f"{P}LEEWAY_SECONDS", d.leeway, hi=600),
            jwks_ttl=read_seconds(env, f"{P}JWKS_TTL_SECONDS", d.jwks_ttl, hi=86400),
            jwks_cooldown=read_seconds(env, f"{P}JWKS_COOLDOWN_SECONDS", d.jwks_cooldown, hi=3600),
            signing_alg=read_str(env, f"{P}SIGNING_ALG", d.signing_alg, choices=("ES256", "RS256")),
            key_file=Path(key_file) if key_file else None,
            seed_file=Path(seed) if seed else None,
            cache_size=read_int(env, f"{P}CACHE_SIZE", d.cache_size, 0, 10_000_000),
            rbac_wait=read_seconds(env, f"{P}RBAC_WAIT_SECONDS", d.rbac_wait, hi=300),
            local_client=read_bool(
                env,
                f"{P}LOCAL_CLIENT",
                not env.get(f"{PREFIX}SERVICE_CLIENT_ID", "").strip(),
            ),
            key_dir=config.data_dir / "auth" / "keys",
        )


def gateway_url(config: MeshConfig, env: Mapping[str, str]) -> str:
    """Where the REST gateway of this mesh is reached: the default issuer URL.

    Discovery, the JWKS URL and the token endpoint are served by the gateway,
    so the issuer follows its address. A gateway on a random port (``0``) or
    behind a proxy cannot be guessed: set ``AUTOECOOPS_AUTH_ISSUER`` then.
    """
    port = read_int(env, f"{PREFIX}GATEWAY_PORT", 8080, 0, 65535) or 8080
    host = _dial_host(config.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal in a URL
    return f"http://{host}:{port}"


def read_local_client(path: Path) -> tuple[str, str] | None:
    """(client id, secret) from a local client file, or None if there is none usable."""
    try:
        data = json.loads(path.read_text())
        return str(data["client_id"]), str(data["client_secret"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
