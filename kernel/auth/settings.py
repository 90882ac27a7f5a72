"""auth-service settings, read with the mesh's one config loader."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoecoops.kernel.mesh.config import MeshConfig, read_int, read_seconds, read_str

P = "AUTOECOOPS_AUTH_"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Issuer, token and cache settings (``AUTOECOOPS_AUTH_*``)."""

    #: The ``iss`` of our tokens; the URL whose /.well-known/openid-configuration
    #: the gateway serves (``AUTOECOOPS_AUTH_ISSUER``).
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
    #: Where keys live: ``<data dir>/auth/keys``.
    key_dir: Path = Path(".autoecoops/auth/keys")

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
            issuer=read_str(env, f"{P}ISSUER", d.issuer).rstrip("/"),
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
            key_dir=config.data_dir / "auth" / "keys",
        )
