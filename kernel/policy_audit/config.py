"""policy-audit's settings, read once at start from ``AUTOECOOPS_POLICY_AUDIT_*``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoecoops.kernel.mesh.config import MeshConfig, read_bool, read_int, read_seconds, read_str

ENV = "AUTOECOOPS_POLICY_AUDIT_"
SHIPPED_POLICIES = Path(__file__).resolve().parent / "policies"
SHIPPED_CONTROLS = Path(__file__).resolve().parent / "controls.yaml"


@dataclass(frozen=True)
class Settings:
    """What policy-audit needs beyond the mesh settings."""

    #: The log's identity: the first line of every checkpoint and the key's name (``ORIGIN``).
    origin: str = "autoecoops.audit/v1"
    #: The Ed25519 signer key file (``SIGNING_KEY_FILE``). Created on first start
    #: when it is the default path under the data directory; a path given
    #: explicitly must exist.
    signing_key_file: Path = Path(".autoecoops/policy-audit/checkpoint.key")
    #: Whether a missing key file may be created.
    create_key: bool = True
    #: Largest entry, in canonical bytes (``MAX_ENTRY_BYTES``).
    max_entry_bytes: int = 64 * 1024
    #: Most entries written by one group commit (``COMMIT_BATCH``).
    commit_batch: int = 1024
    #: Directory of bundles (sub-directories or .tar.gz files) watched and
    #: loaded on change; empty disables it (``BUNDLE_DIR``).
    bundle_dir: Path | None = None
    #: Load the shipped platform policies as bundle "platform" (``SHIPPED_POLICIES``).
    shipped_policies: bool = True
    #: How often the bundle directory and the shared bundle registry are polled (``BUNDLE_POLL_SECONDS``).
    bundle_poll: float = 1.0
    #: Publish EntryAppended (topic ``audit.entries``) for every entry (``ENTRY_EVENTS``).
    entry_events: bool = True
    #: The controls catalogue (``CONTROLS_FILE``).
    controls_file: Path = SHIPPED_CONTROLS

    @classmethod
    def from_env(cls, env: Mapping[str, str], mesh: MeshConfig) -> Settings:
        """Read and validate; ``ConfigError`` names a bad variable."""
        key_env = env.get(f"{ENV}SIGNING_KEY_FILE", "").strip()
        bundle_dir = env.get(f"{ENV}BUNDLE_DIR", "").strip()
        controls = env.get(f"{ENV}CONTROLS_FILE", "").strip()
        return cls(
            origin=read_str(env, f"{ENV}ORIGIN", cls.origin),
            signing_key_file=Path(key_env)
            if key_env
            else mesh.data_dir / "policy-audit" / "checkpoint.key",
            create_key=not key_env,
            max_entry_bytes=read_int(
                env, f"{ENV}MAX_ENTRY_BYTES", cls.max_entry_bytes, 1024, 1 << 24
            ),
            commit_batch=read_int(env, f"{ENV}COMMIT_BATCH", cls.commit_batch, 1, 10_000),
            bundle_dir=Path(bundle_dir) if bundle_dir else None,
            shipped_policies=read_bool(env, f"{ENV}SHIPPED_POLICIES", cls.shipped_policies),
            bundle_poll=read_seconds(env, f"{ENV}BUNDLE_POLL_SECONDS", cls.bundle_poll, 600),
            entry_events=read_bool(env, f"{ENV}ENTRY_EVENTS", cls.entry_events),
            controls_file=Path(controls) if controls else SHIPPED_CONTROLS,
        )
