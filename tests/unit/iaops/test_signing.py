"""Offline keyed verification against signatures made here with `cryptography` in exactly
cosign's layout: simple signing, DSSE with PAE, in-toto Statement v1 + SLSA provenance v1."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument
from autoecoops.platforms.iaops import signing

DIGEST = "sha256:" + hashlib.sha256(b"an image manifest").hexdigest()
REF = "ghcr.io/autoecoops/memory-hub:1.4.0"
BUILDER = "https://github.com/slsa-framework/slsa-github-generator/.github/workflows/generator_container_slsa3.yml@refs/tags/v2.0.0"
REPO = "https://github.com/autoecoops/autoecoops"

Key = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def pem(key: Key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign(key: Key, message: bytes) -> bytes:
    """cosign's schemes: ECDSA P-256 ASN.1 DER over SHA-256; pure Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def simple_signing_payload(
    digest: str = DIGEST, ref: str = "ghcr.io/autoecoops/memory-hub"
) -> bytes:
    """The payload `cosign sign` writes (compact JSON, as cosign marshals it)."""
    return json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": ref},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()


def statement(
    digest: str = DIGEST, builder: str = BUILDER, ref: str = "refs/heads/main"
) -> dict[str, Any]:
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [
            {
                "name": "ghcr.io/autoecoops/memory-hub",
                "digest": {"sha256": digest.removeprefix("sha256:")},
            }
        ],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "https://slsa-framework.github.io/github-actions-buildtypes/workflow/v1",
                "externalParameters": {
                    "workflow": {
                        "ref": ref,
                        "repository": REPO,
                        "path": ".github/workflows/release.yml",
                    }
                },
                "resolvedDependencies": [
                    {"uri": f"git+{REPO}@{ref}", "digest": {"gitCommit": "a" * 40}}
                ],
            },
            "runDetails": {"builder": {"id": builder}, "metadata": {"invocationId": "run-1"}},
        },
    }


def dsse(
    key: Key, doc: dict[str, Any], payload_type: str = "application/vnd.in-toto+json"
) -> bytes:
    """A DSSE envelope as `cosign attest` writes it."""
    body = json.dumps(doc).encode()
    sig = sign(key, signing.pae(payload_type, body))
    return json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(body).decode(),
            "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}],
        }
    ).encode()


POLICY = signing.ProvenancePolicy(
    (BUILDER,), "git+https://github.com/autoecoops/autoecoops.git", ("refs/heads/main",)
)


def verify(
    key: Key, *, sigs: list[tuple[bytes, str]] = (), atts: list[bytes] = (), **kw: Any
) -> signing.Verification:  # type: ignore[assignment]
    args: dict[str, Any] = {
        "artifact_ref": REF,
        "digest": DIGEST,
        "public_key": pem(key),
        "signatures": list(sigs),
        "attestations": list(atts),
        "policy": POLICY,
    }
    args.update(kw)
    return signing.verify(**args)


KEYS = {
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def test_pae_matches_the_dsse_spec_example() -> None:
    assert signing.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.mark.parametrize("algorithm", sorted(KEYS))
def test_a_cosign_signature_and_slsa_provenance_verify(algorithm: str) -> None:
    key = KEYS[algorithm]()
    payload = simple_signing_payload()
    sig = base64.b64encode(sign(key, payload)).decode()
    got = verify(key, sigs=[(payload, sig)], atts=[dsse(key, statement())])
    assert got.verified, [c for c in got.checks if not c.passed]
    assert got.signed and got.algorithm == algorithm
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert got.key_id == "sha256:" + hashlib.sha256(der).hexdigest()
    names = {c.name for c in got.checks}
    assert {
        "signature[0]",
        "signature[0].digest",
        "attestation[0]",
        "attestation[0].subject",
        "attestation[0].builder",
        "attestation[0].source",
        "attestation[0].ref",
    } <= names
    assert got.provenance == {
        "builder_id": BUILDER,
        "source_repository": REPO,
        "source_ref": "refs/heads/main",
    }


@pytest.mark.parametrize("algorithm", sorted(KEYS))
def test_tampering_and_policy_violations_fail_their_check(algorithm: str) -> None:
    key = KEYS[algorithm]()
    other = KEYS[algorithm]()
    payload = simple_signing_payload()
    sig = base64.b64encode(sign(key, payload)).decode()

    def failed(**kw: Any) -> list[str]:
        v = verify(key, **kw)
        assert not v.verified
        return v.failed

    assert failed(sigs=[(payload.replace(b"memory-hub", b"evil-hub"), sig)]) == ["signature[0]"]
    assert failed(sigs=[(payload, base64.b64encode(sign(other, payload)).decode())]) == [
        "signature[0]"
    ]
    wrong_digest = simple_signing_payload("sha256:" + "0" * 64)
    assert failed(sigs=[(wrong_digest, base64.b64encode(sign(key, wrong_digest)).decode())]) == [
        "signature[0].digest"
    ]
    assert failed(atts=[dsse(key, statement(builder="https://evil.example/builder"))]) == [
        "attestation[0].builder"
    ]
    assert failed(atts=[dsse(key, statement(ref="refs/heads/feature"))]) == ["attestation[0].ref"]
    assert failed(atts=[dsse(key, statement(digest="sha256:" + "1" * 64))]) == [
        "attestation[0].subject"
    ]
    assert failed(atts=[dsse(other, statement())]) == ["attestation[0]"]
    env = json.loads(dsse(key, statement()))
    env["payloadType"] = "application/json"  # the signature covers the type through PAE
    assert failed(atts=[json.dumps(env).encode()]) == ["attestation[0]"]
    other_repo = signing.ProvenancePolicy((BUILDER,), "https://github.com/someone/else", ())
    assert failed(atts=[dsse(key, statement())], policy=other_repo) == ["attestation[0].source"]


def test_bad_input_is_invalid_argument_and_keyless_needs_the_network() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    payload = simple_signing_payload()
    sig = base64.b64encode(sign(key, payload)).decode()
    with pytest.raises(FailedPrecondition) as keyless:
        verify(key, sigs=[(payload, sig)], keyless=True)
    assert keyless.value.reason == "KEYLESS_NEEDS_NETWORK"
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"digest": ""}, "digest", "DIGEST_REQUIRED"),
        ({"digest": "md5:abc"}, "digest", "INVALID_DIGEST"),
        (
            {"artifact_ref": REF.replace(":1.4.0", "@sha256:" + "2" * 64)},
            "digest",
            "DIGEST_MISMATCH",
        ),
        ({"public_key": ""}, "public_key", "PUBLIC_KEY_REQUIRED"),
        ({"public_key": "not a key"}, "public_key", "INVALID_PUBLIC_KEY"),
        (
            {"public_key": pem(ec.generate_private_key(ec.SECP384R1()))},
            "public_key",
            "UNSUPPORTED_KEY",
        ),
        (
            {
                "public_key": rsa.generate_private_key(65537, 2048)
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .decode()
            },
            "public_key",
            "UNSUPPORTED_KEY",
        ),
    ]
    for kw, field, reason in cases:
        with pytest.raises(InvalidArgument) as err:
            verify(key, sigs=[(payload, sig)], **kw)
        assert err.value.reason == reason and err.value.field_violations[0].field == field, kw
    with pytest.raises(InvalidArgument) as nothing:
        verify(key)
    assert nothing.value.reason == "NOTHING_TO_VERIFY"
    # The digest pinned in the reference is enough on its own.
    pinned = verify(
        key,
        sigs=[(payload, sig)],
        digest="",
        artifact_ref=f"ghcr.io/autoecoops/memory-hub@{DIGEST}",
    )
    assert pinned.verified
