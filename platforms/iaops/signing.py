"""Offline, keyed verification in cosign's formats: simple signing and DSSE with in-toto/SLSA.

- Simple signing (``cosign sign --key``): the payload is the JSON
  ``{"critical": {"identity": {"docker-reference": R}, "image":
  {"docker-manifest-digest": D}, "type": "cosign container image
  signature"}, "optional": ...}``; the signature (base64, as in the
  ``dev.cosignproject.cosign/signature`` annotation) is over the payload
  bytes exactly as stored.
- DSSE (``cosign attest --key``): ``{"payloadType", "payload" (base64),
  "signatures": [{"keyid", "sig"}]}``; the signature is over the
  pre-authentication encoding ``"DSSEv1" SP LEN(type) SP type SP LEN(body)
  SP body`` (lengths as ASCII decimals of byte counts).
- Keys: ECDSA P-256 (signatures ASN.1 DER over SHA-256, as cosign writes
  them) and Ed25519 (pure Ed25519 over the message), as PEM public keys.
- in-toto Statement v1 with SLSA provenance v1: the subject's sha256 must
  be the artifact's digest, ``runDetails.builder.id`` must be allowed, and
  the source repository and ref must match the policy.

Keyless signing (a Fulcio certificate and a Rekor entry) needs the network
to check the transparency log and certificate chain: it is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from autoecoops.kernel.mesh.errors import FailedPrecondition, FieldViolation, InvalidArgument
from autoecoops.platforms.iaops.rules import as_map

SIMPLE_SIGNING_TYPE = "cosign container image signature"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class Check:
    """One verification check."""

    name: str
    passed: bool
    message: str = ""


@dataclass(slots=True)
class Verification:
    """What verifying an artifact found."""

    digest: str
    key_id: str = ""
    algorithm: str = ""
    checks: list[Check] = field(default_factory=list)
    signed: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        """Every check passed (and there was at least one)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        """The names of the checks that failed."""
        return [c.name for c in self.checks if not c.passed]


@dataclass(frozen=True, slots=True)
class ProvenancePolicy:
    """What the provenance must say."""

    allowed_builder_ids: tuple[str, ...] = ()
    source_repository: str = ""
    allowed_refs: tuple[str, ...] = ()


def _bad(field_name: str, message: str, reason: str) -> InvalidArgument:
    return InvalidArgument(
        message, reason=reason, field_violations=[FieldViolation(field_name, message)]
    )


def load_key(pem: str) -> tuple[PublicKey, str, str]:
    """(key, key id, algorithm) of a PEM public key; ECDSA P-256 or Ed25519 only."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise _bad("public_key", "not a PEM public key", "INVALID_PUBLIC_KEY") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise _bad(
                "public_key",
                f"ECDSA curve {key.curve.name} is not supported (P-256 only)",
                "UNSUPPORTED_KEY",
            )
        algorithm = "ecdsa-p256"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        algorithm = "ed25519"
    else:
        raise _bad(
            "public_key", "only ECDSA P-256 and Ed25519 keys are supported", "UNSUPPORTED_KEY"
        )
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, "sha256:" + hashlib.sha256(der).hexdigest(), algorithm


def verify_bytes(key: PublicKey, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s over ``message`` (cosign's schemes)."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _b64(value: str) -> bytes:
    # DSSE allows standard or URL-safe base64, padded or not.
    value = value.strip()
    padded = value + "=" * (-len(value) % 4)
    try:
        if "-" in value or "_" in value:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def artifact_digest(ref: str, digest: str) -> str:
    """The artifact's digest from ``digest`` or an ``@sha256:`` in ``ref``; they must agree."""
    pinned = ref.split("@", 1)[1] if "@" in ref else ""
    if digest and not DIGEST.match(digest):
        raise _bad("digest", "must be sha256: and 64 lowercase hex digits", "INVALID_DIGEST")
    if pinned and not DIGEST.match(pinned):
        raise _bad(
            "artifact_ref", "the @digest must be sha256: and 64 hex digits", "INVALID_DIGEST"
        )
    if digest and pinned and digest != pinned:
        raise _bad("digest", "differs from the digest pinned in artifact_ref", "DIGEST_MISMATCH")
    found = digest or pinned
    if not found:
        raise _bad(
            "digest", "required unless artifact_ref pins one (name@sha256:...)", "DIGEST_REQUIRED"
        )
    return found


def repository_of(ref: str) -> str:
    """The repository part of an image reference (no tag, no digest)."""
    rest = ref.split("@", 1)[0]
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    return rest[:colon] if colon > slash else rest


def check_simple_signing(
    key: PublicKey, payload: bytes, signature_b64: str, digest: str, repository: str, i: int
) -> list[Check]:
    """The checks of one cosign simple-signing signature."""
    name = f"signature[{i}]"
    try:
        sig = _b64(signature_b64)
    except ValueError:
        return [Check(name, False, "the signature is not base64")]
    if not verify_bytes(key, payload, sig):
        return [Check(name, False, "the signature does not verify with the public key")]
    checks = [Check(name, True, "signature verified")]
    try:
        doc = json.loads(payload)
        critical = doc["critical"]
        kind = critical["type"]
        signed_digest = critical["image"]["docker-manifest-digest"]
        signed_ref = critical["identity"]["docker-reference"]
    except (ValueError, KeyError, TypeError):
        return [*checks, Check(f"{name}.payload", False, "not a cosign simple-signing payload")]
    checks.append(Check(f"{name}.type", kind == SIMPLE_SIGNING_TYPE, f"payload type {kind!r}"))
    checks.append(
        Check(
            f"{name}.digest",
            signed_digest == digest,
            f"signed digest {signed_digest}"
            + ("" if signed_digest == digest else f", expected {digest}"),
        )
    )
    if repository:
        ok = repository_of(str(signed_ref)) == repository
        checks.append(Check(f"{name}.identity", ok, f"signed for {signed_ref!r}"))
    return checks


def _provenance_source(predicate: Mapping[str, Any]) -> tuple[str, str]:
    """(repository, ref) of a SLSA v1 provenance: the GitHub Actions workflow
    parameters when present, else the first git+ resolved dependency."""
    bd = as_map(predicate.get("buildDefinition"))
    ext = as_map(bd.get("externalParameters"))
    wf = as_map(ext.get("workflow"))
    if wf.get("repository"):
        return str(wf["repository"]), str(wf.get("ref", ""))
    for dep in bd.get("resolvedDependencies") or []:
        uri = str(dep.get("uri", "")) if isinstance(dep, Mapping) else ""
        if uri.startswith("git+"):
            repo, _, ref = uri[4:].partition("@")
            return repo, ref
    return "", ""


def _same_repo(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return s.removeprefix("git+").removesuffix(".git").rstrip("/").lower()

    return norm(a) == norm(b)


def check_attestation(
    key: PublicKey,
    envelope: bytes,
    digest: str,
    policy: ProvenancePolicy,
    i: int,
    out: Verification,
) -> list[Check]:
    """The checks of one DSSE envelope holding an in-toto Statement."""
    name = f"attestation[{i}]"
    try:
        env = json.loads(envelope)
        payload_type = env["payloadType"]
        payload = _b64(env["payload"])
        signatures = env["signatures"]
        if not isinstance(signatures, list) or not signatures:
            raise KeyError("signatures")
    except (ValueError, KeyError, TypeError):
        return [Check(name, False, "not a DSSE envelope (payloadType, payload, signatures)")]
    message = pae(str(payload_type), payload)
    ok = False
    for s in signatures:
        try:
            if isinstance(s, Mapping) and verify_bytes(key, message, _b64(str(s.get("sig", "")))):
                ok = True
                break
        except ValueError:
            continue
    if not ok:
        return [Check(name, False, "no DSSE signature verifies with the public key")]
    checks = [Check(name, True, "DSSE signature verified")]
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        return [*checks, Check(f"{name}.payload_type", False, f"payload type {payload_type!r}")]
    try:
        statement = json.loads(payload)
    except ValueError:
        return [*checks, Check(f"{name}.statement", False, "the payload is not JSON")]
    if statement.get("_type") != STATEMENT_V1:
        checks.append(
            Check(
                f"{name}.statement",
                False,
                f"_type {statement.get('_type')!r}, not in-toto Statement v1",
            )
        )
        return checks
    subjects = statement.get("subject") or []
    want = digest.removeprefix("sha256:")
    matched = any(
        isinstance(s, Mapping)
        and isinstance(s.get("digest"), Mapping)
        and s["digest"].get("sha256") == want
        for s in subjects
    )
    checks.append(
        Check(
            f"{name}.subject",
            matched,
            "a subject matches the digest" if matched else f"no subject has sha256 {want}",
        )
    )
    if statement.get("predicateType") != SLSA_PROVENANCE_V1:
        checks.append(
            Check(
                f"{name}.predicate_type",
                False,
                f"predicateType {statement.get('predicateType')!r}, not SLSA provenance v1",
            )
        )
        return checks
    predicate = as_map(statement.get("predicate"))
    rd = as_map(predicate.get("runDetails"))
    builder = (
        str((rd.get("builder") or {}).get("id", ""))
        if isinstance(rd.get("builder"), Mapping)
        else ""
    )
    repo, ref = _provenance_source(predicate)
    out.provenance = {"builder_id": builder, "source_repository": repo, "source_ref": ref}
    if policy.allowed_builder_ids:
        ok = builder in policy.allowed_builder_ids
        checks.append(
            Check(f"{name}.builder", ok, f"builder {builder!r}" + ("" if ok else " is not allowed"))
        )
    if policy.source_repository:
        ok = bool(repo) and _same_repo(repo, policy.source_repository)
        checks.append(Check(f"{name}.source", ok, f"built from {repo or 'an unknown repository'}"))
    if policy.allowed_refs:
        ok = ref in policy.allowed_refs
        checks.append(Check(f"{name}.ref", ok, f"built from ref {ref or '(none)'}"))
    return checks


def verify(
    *,
    artifact_ref: str,
    digest: str,
    public_key: str,
    signatures: Sequence[tuple[bytes, str]],
    attestations: Iterable[bytes],
    policy: ProvenancePolicy,
    keyless: bool = False,
) -> Verification:
    """Verify an artifact offline; bad input is INVALID_ARGUMENT, keyless FAILED_PRECONDITION."""
    if keyless:
        raise FailedPrecondition(
            "keyless verification needs Fulcio's certificate chain and Rekor's transparency log, "
            "which are not reachable offline; verify with a public key",
            reason="KEYLESS_NEEDS_NETWORK",
        )
    if not artifact_ref:
        raise _bad("artifact_ref", "required", "ARTIFACT_REF_REQUIRED")
    found = artifact_digest(artifact_ref, digest)
    attestations = list(attestations)
    if not signatures and not attestations:
        raise InvalidArgument(
            "nothing to verify: give signatures or attestations",
            reason="NOTHING_TO_VERIFY",
            field_violations=[
                FieldViolation("signatures", "a cosign signature, or"),
                FieldViolation("attestations", "a DSSE attestation"),
            ],
        )
    if not public_key:
        raise _bad("public_key", "required for keyed verification (PEM)", "PUBLIC_KEY_REQUIRED")
    key, key_id, algorithm = load_key(public_key)
    out = Verification(found, key_id, algorithm)
    repository = repository_of(artifact_ref)
    for i, (payload, sig) in enumerate(signatures):
        out.checks.extend(check_simple_signing(key, payload, sig, found, repository, i))
    for i, env in enumerate(attestations):
        out.checks.extend(check_attestation(key, env, found, policy, i, out))
    out.signed = any(c.passed and c.name.count(".") == 0 for c in out.checks)
    return out
