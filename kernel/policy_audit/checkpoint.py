"""Signed checkpoints: the C2SP tlog-checkpoint body in a C2SP signed note.

A checkpoint body is three lines: the log's origin, the tree size in
decimal, and the base64 root hash. The note adds a blank line and one
signature line per signer: ``— <key name> <base64(key hash || signature)>``.
Keys use the Go ``golang.org/x/mod/sumdb/note`` encodings, so the Go
``note`` package, Sigstore's and other witnesses accept them unchanged:

- verifier key ``<name>+<hex key hash>+<base64(0x01 || Ed25519 public key)>``
- signer key   ``PRIVATE+KEY+<name>+<hex key hash>+<base64(0x01 || Ed25519 seed)>``
- key hash     the first 4 bytes of SHA-256(name || "\\n" || 0x01 || public key)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ED25519 = b"\x01"
SIG_PREFIX = "\u2014 "  # an em dash and a space open every signature line


class NoteError(ValueError):
    """A key, note or checkpoint that does not parse or does not verify."""


@dataclass(frozen=True, slots=True)
class CheckpointBody:
    """The signed statement: origin, tree size and root hash."""

    origin: str
    size: int
    root_hash: bytes

    def text(self) -> str:
        """The C2SP tlog-checkpoint body, newline-terminated."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root_hash).decode()}\n"

    @classmethod
    def parse(cls, text: str) -> CheckpointBody:
        """Parse a checkpoint body (extension lines after the third are allowed and ignored)."""
        if not text.endswith("\n"):
            raise NoteError("a checkpoint body ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3 or not lines[0]:
            raise NoteError("a checkpoint body has an origin, a size and a root hash line")
        origin, size_text, root_text = lines[:3]
        if not size_text.isdigit() or (size_text.startswith("0") and size_text != "0"):
            raise NoteError(f"bad tree size {size_text!r}")
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            raise NoteError("the root hash is not base64") from None
        if len(root) != 32:
            raise NoteError("the root hash is not 32 bytes")
        return cls(origin, int(size_text), root)


def _key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + ED25519 + public).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "+ \n\t") or not name.isprintable():
        raise NoteError(f"bad key name {name!r}: non-empty, printable, no '+' or spaces")


class NoteVerifier:
    """Checks one Ed25519 signer's signatures on notes."""

    def __init__(self, name: str, public: bytes) -> None:
        _check_name(name)
        self.name = name
        self.public = public
        self.key_hash = _key_hash(name, public)
        self._key = Ed25519PublicKey.from_public_bytes(public)

    @property
    def key_id(self) -> str:
        """The hex of the 4-byte key hash."""
        return self.key_hash.hex()

    def vkey(self) -> str:
        """The verifier key string ``<name>+<hash>+<base64 key>``."""
        return f"{self.name}+{self.key_id}+{base64.b64encode(ED25519 + self.public).decode()}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key string."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("a verifier key is <name>+<hex key hash>+<base64 key>")
        name, hash_hex, key_b64 = parts
        try:
            raw = base64.b64decode(key_b64, validate=True)
        except binascii.Error:
            raise NoteError("the verifier key is not base64") from None
        if len(raw) != 33 or raw[:1] != ED25519:
            raise NoteError("only Ed25519 verifier keys (algorithm 0x01, 32 bytes) are supported")
        verifier = cls(name, raw[1:])
        if verifier.key_id != hash_hex.lower() or len(hash_hex) != 8:
            raise NoteError("the verifier key's hash does not match its name and key")
        return verifier

    def open(self, note: str) -> str:
        """Verify ``note`` and return its body; ``NoteError`` unless this key signed it."""
        if not note.endswith("\n"):
            raise NoteError("a signed note ends with a newline")
        split = note.rfind("\n\n")
        if split < 0:
            raise NoteError("a signed note has a blank line before its signatures")
        body, sigs = note[: split + 1], note[split + 2 :]
        for line in sigs[:-1].split("\n"):
            if not line.startswith(SIG_PREFIX):
                raise NoteError(f"malformed signature line {line!r}")
            name, _, blob_b64 = line[len(SIG_PREFIX) :].rpartition(" ")
            if name != self.name:
                continue
            try:
                blob = base64.b64decode(blob_b64, validate=True)
            except binascii.Error:
                raise NoteError("a signature is not base64") from None
            if len(blob) < 5 or blob[:4] != self.key_hash:
                continue
            try:
                self._key.verify(blob[4:], body.encode())
            except InvalidSignature:
                raise NoteError(f"the signature of {self.name} does not verify") from None
            return body
        raise NoteError(f"the note carries no signature by {self.name}+{self.key_id}")


class NoteSigner:
    """Signs notes with one Ed25519 key."""

    def __init__(self, name: str, private: Ed25519PrivateKey) -> None:
        _check_name(name)
        self.name = name
        self._private = private
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier = NoteVerifier(name, public)

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        """A fresh random key."""
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> NoteSigner:
        """Parse a ``PRIVATE+KEY+...`` signer key string."""
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("a signer key is PRIVATE+KEY+<name>+<hex key hash>+<base64 key>")
        name, hash_hex, key_b64 = parts[2:]
        try:
            raw = base64.b64decode(key_b64, validate=True)
        except binascii.Error:
            raise NoteError("the signer key is not base64") from None
        if len(raw) != 33 or raw[:1] != ED25519:
            raise NoteError("only Ed25519 signer keys (algorithm 0x01, 32-byte seed) are supported")
        signer = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_id != hash_hex.lower():
            raise NoteError("the signer key's hash does not match its name and key")
        return signer

    def skey(self) -> str:
        """The signer key string (secret)."""
        seed = self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return (
            f"PRIVATE+KEY+{self.name}+{self.verifier.key_id}+"
            f"{base64.b64encode(ED25519 + seed).decode()}"
        )

    def sign(self, body: str) -> str:
        """The signed note: ``body``, a blank line and this key's signature line."""
        if not body.endswith("\n"):
            raise NoteError("a note body ends with a newline")
        sig = self._private.sign(body.encode())
        blob = base64.b64encode(self.verifier.key_hash + sig).decode()
        return f"{body}\n{SIG_PREFIX}{self.name} {blob}\n"


def load_or_create_signer(path: Path, name: str, create: bool) -> tuple[NoteSigner, bool]:
    """The signer key in ``path``; generated (mode 0600) there when absent and ``create``.

    Returns the signer and whether it was created now.
    """
    if path.exists():
        signer = NoteSigner.from_skey(path.read_text())
        return signer, False
    if not create:
        raise NoteError(f"{path}: no such signing key file")
    signer = NoteSigner.generate(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two replicas starting at once on a shared data directory must end up with
    # one key: the key is written whole to a file of this process's own, then
    # hard-linked to ``path``, which fails if another process got there first.
    # The loser then loads the winner's key (once linked, the file is complete)
    # instead of refusing to start, as an O_EXCL create of ``path`` itself made it.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(signer.skey() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return NoteSigner.from_skey(path.read_text()), False
    finally:
        tmp.unlink()
    path.with_name(path.name + ".pub").write_text(signer.verifier.vkey() + "\n")
    return signer, True
