"""Signing keys of our token issuer: creation, storage, rotation and the JWKS.

Keys live as PEM files with a small JSON manifest under
``<data dir>/auth/keys`` (mode 0600), or come from a file a Kubernetes Secret
mounts. Rotation follows the JWKS rule: a new key is *published* at once but
*signs* only after ``publish_delay`` (the time verifiers may cache the old
JWKS), and a retired key stays published until every token it signed has
expired.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument

ALGORITHMS = ("ES256", "RS256")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """When a key may sign and until when it must stay published."""

    kid: str
    alg: str
    created: float
    #: The key signs from this time on (publish first, sign later).
    active_from: float
    #: Set when a newer key takes over; the key is dropped after ``retire_after``.
    superseded_at: float | None = None
    retire_after: float | None = None


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its metadata."""

    meta: KeyMeta
    private: PrivateKey

    @property
    def public(self) -> PublicKey:
        """The public half."""
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK (RFC 7517 4) with exactly its type's members
        (RFC 7518 6.2.1 for EC: crv, x, y; 6.3.1 for RSA: n, e)."""
        if isinstance(self.public, ec.EllipticCurvePublicKey):
            full: dict[str, Any] = ECAlgorithm.to_jwk(self.public, as_dict=True)
            members: tuple[str, ...] = ("crv", "x", "y")
        else:
            full = RSAAlgorithm.to_jwk(self.public, as_dict=True)
            members = ("n", "e")
        jwk = {"kty": full["kty"], "kid": self.meta.kid, "use": "sig", "alg": self.meta.alg}
        jwk.update((m, full[m]) for m in members)
        return jwk


def generate(alg: str) -> PrivateKey:
    """A fresh private key for ``alg``."""
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise InvalidArgument(
        f"signing algorithm {alg!r} is not supported; use ES256 or RS256",
        reason="ALGORITHM_UNSUPPORTED",
    )


def load_pem(path: Path) -> tuple[PrivateKey, str]:
    """A private key from a PEM file and the algorithm it implies."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return key, "ES256"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return key, "RS256"
    raise FailedPrecondition(f"{path}: signing key must be EC P-256 or RSA >= 2048 bits")


class KeyRing:
    """The issuer's keys on disk; thread-unsafe by design (one owner: auth-service)."""

    def __init__(self, directory: Path, *, publish_delay: float, max_token_ttl: float) -> None:
        self.directory = directory
        self.publish_delay = publish_delay
        #: Longest lifetime of a token we sign; retired keys stay published that long.
        self.max_token_ttl = max_token_ttl
        self._keys: list[SigningKey] = []
        self._public_cache: tuple[tuple[str, ...], dict[str, tuple[str, PublicKey]]] | None = None

    @property
    def keys(self) -> Sequence[SigningKey]:
        """Every published key, oldest first."""
        return tuple(self._keys)

    def load_or_create(self, alg: str = "ES256", key_file: Path | None = None) -> None:
        """Load the ring; create the first key (or import ``key_file``) if empty."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Replicas of auth-service sharing a data directory start together:
        # without the lock each would create a first key of its own, sign with
        # it, and publish only the one whose manifest was written last.
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load_or_create(alg, key_file)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load_or_create(self, alg: str, key_file: Path | None) -> None:
        manifest = self.directory / "keys.json"
        if manifest.exists():
            for entry in json.loads(manifest.read_text()):
                meta = KeyMeta(**entry)
                pem = (self.directory / f"{meta.kid}.pem").read_bytes()
                key = serialization.load_pem_private_key(pem, password=None)
                assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
                self._keys.append(SigningKey(meta, key))
        if key_file is not None:
            private, file_alg = load_pem(key_file)
            kid = _kid(private)
            if all(k.meta.kid != kid for k in self._keys):
                # A supplied key signs at once: the operator distributed it deliberately.
                now = time.time()
                self._add(SigningKey(KeyMeta(kid, file_alg, now, now), private))
        elif not self._keys:
            now = time.time()
            private = generate(alg)
            self._add(SigningKey(KeyMeta(_kid(private), alg, now, now), private))
        self._prune()

    def rotate(self, alg: str = "ES256", now: float | None = None) -> SigningKey:
        """Publish a new key now; it takes over signing after ``publish_delay``."""
        now = time.time() if now is None else now
        private = generate(alg)
        new = SigningKey(KeyMeta(_kid(private), alg, now, now + self.publish_delay), private)
        # The current signer stops signing when the new one starts; tokens it
        # signed until then live at most max_token_ttl longer.
        handover = new.meta.active_from
        self._keys = [
            k
            if k.meta.superseded_at is not None
            else SigningKey(
                KeyMeta(
                    **{
                        **asdict(k.meta),
                        "superseded_at": handover,
                        "retire_after": handover + self.max_token_ttl,
                    }
                ),
                k.private,
            )
            for k in self._keys
        ]
        self._add(new)
        return new

    def signer(self, now: float | None = None) -> SigningKey:
        """The key that signs now: the newest one whose activation has come."""
        now = time.time() if now is None else now
        active = [k for k in self._keys if k.meta.active_from <= now]
        if not active:
            raise FailedPrecondition("no signing key is active")
        return max(active, key=lambda k: k.meta.active_from)

    def jwks(self, now: float | None = None) -> list[dict[str, Any]]:
        """The published keys (pending, current and not-yet-retired) as JWKs."""
        self._prune(now)
        return [k.jwk() for k in self._keys]

    def public_keys(self) -> dict[str, tuple[str, PublicKey]]:
        """kid -> (alg, public key) of every published key.

        Cached per set of keys: deriving a public key costs ~10 µs, and
        auth-service looks one up on every token it verifies.
        """
        kids = tuple(k.meta.kid for k in self._keys)
        if self._public_cache is None or self._public_cache[0] != kids:
            self._public_cache = (kids, {k.meta.kid: (k.meta.alg, k.public) for k in self._keys})
        return self._public_cache[1]

    def _add(self, key: SigningKey) -> None:
        self._keys.append(key)
        pem = key.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.directory / f"{key.meta.kid}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        self._save()

    def _prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        keep = [k for k in self._keys if k.meta.retire_after is None or k.meta.retire_after > now]
        if len(keep) != len(self._keys):
            for gone in set(k.meta.kid for k in self._keys) - set(k.meta.kid for k in keep):
                (self.directory / f"{gone}.pem").unlink(missing_ok=True)
            self._keys = keep
            self._save()

    def _save(self) -> None:
        tmp = self.directory / f"keys.json.{os.getpid()}.tmp"  # replicas never share one
        tmp.write_text(json.dumps([asdict(k.meta) for k in self._keys], indent=1))
        os.replace(tmp, self.directory / "keys.json")


def _kid(private: PrivateKey) -> str:
    """The RFC 7638 JWK thumbprint: stable for a supplied key across restarts."""
    public = private.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(public, as_dict=True)
        members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    else:
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        members = {k: jwk[k] for k in ("e", "kty", "n")}
    digest = hashlib.sha256(
        json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:22]
