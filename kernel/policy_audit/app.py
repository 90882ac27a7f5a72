"""policy-audit's wiring: settings, signing key, Redis-backed log and registry, background tasks."""

from __future__ import annotations

import asyncio
import logging
import os

from autoecoops.kernel.mesh.audit import AuditTrail
from autoecoops.kernel.mesh.errors import ConfigError, FailedPrecondition
from autoecoops.kernel.mesh.outbox import Outbox
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.kernel.policy_audit.bundles import (
    BundleRegistry,
    BundleSpec,
    load_dir,
    load_tarball,
    scan_bundle_dir,
)
from autoecoops.kernel.policy_audit.checkpoint import NoteError, load_or_create_signer
from autoecoops.kernel.policy_audit.compliance import Control, load_catalogue
from autoecoops.kernel.policy_audit.config import SHIPPED_POLICIES, Settings
from autoecoops.kernel.policy_audit.decisions import Decider, DecisionLogger
from autoecoops.kernel.policy_audit.store import AuditStore
from autoecoops.kernel.policy_audit.trail import AuditLog

log = logging.getLogger("autoecoops.policy_audit")
SERVICE = "policy-audit"
SHIPPED_BUNDLE = "platform"


class PolicyAudit:
    """Everything the two servicers share."""

    def __init__(self, runtime: Runtime, settings: Settings) -> None:
        self.runtime = runtime
        self.settings = settings
        try:
            self.signer, created = load_or_create_signer(
                settings.signing_key_file, settings.origin, settings.create_key
            )
        except (NoteError, OSError) as err:
            raise ConfigError(f"AUTOECOOPS_POLICY_AUDIT_SIGNING_KEY_FILE: {err}") from None
        if created:
            log.debug("created the audit log's signing key %s", settings.signing_key_file)
        self.controls: list[Control] = load_catalogue(settings.controls_file)
        self._audit: AuditLog | None = None
        self._registry: BundleRegistry | None = None
        self._logger: DecisionLogger | None = None
        self._decider: Decider | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def _need_redis(self) -> None:
        if not self.runtime.config.redis_url:
            raise FailedPrecondition("policy-audit needs Redis and none is configured (REDIS_URL)")

    @property
    def audit(self) -> AuditLog:
        """The audit log (connects to Redis on first use)."""
        if self._audit is None:
            self._need_redis()
            base = self.runtime.key(SERVICE, "{audit}")
            box = self._outbox()
            self._audit = AuditLog(
                AuditStore(
                    self.runtime.redis,
                    base,
                    box.events_key if box and self.settings.entry_events else "",
                    wait_replicas=self.runtime.config.wait_replicas,
                    wait_timeout_ms=self.runtime.config.redis_wait_timeout_ms,
                ),
                self.signer,
                self.settings.origin,
                max_entry_bytes=self.settings.max_entry_bytes,
                commit_batch=self.settings.commit_batch,
            )
        return self._audit

    @property
    def registry(self) -> BundleRegistry:
        """The bundle registry."""
        if self._registry is None:
            self._need_redis()
            self._registry = BundleRegistry(
                self.runtime.redis, self.runtime.key(SERVICE), self._outbox()
            )
        return self._registry

    @property
    def decider(self) -> Decider:
        """Evaluate with decision logging."""
        if self._decider is None:
            self._logger = DecisionLogger(self.audit, self._outbox())
            self._decider = Decider(self.registry, self._logger)
        return self._decider

    def _outbox(self) -> Outbox | None:
        trail = self.runtime.auditor
        return trail.outbox(SERVICE) if isinstance(trail, AuditTrail) else None

    def start(self) -> None:
        """Start the bundle watcher (when Redis is configured)."""
        if self.runtime.config.redis_url:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop(), name="bundles")

    async def check_signing_key(self) -> None:
        """Report NOT_SERVING, with the reason, while the log is signed by another key.

        Appends and checkpoints answer FAILED_PRECONDITION SIGNING_KEY_MISMATCH
        then; health says so too, so an orchestrator or `autoecoops status`
        shows the service as broken rather than SERVING.
        """
        if not self.runtime.config.redis_url:
            return
        try:
            self.audit.check_key((await self.audit.store.head()).vkey)
        except FailedPrecondition as err:
            await self.runtime.set_unhealthy(SERVICE, err.message)
            return
        except Exception as err:
            # Redis down at start is reported by each call; the check runs again later.
            log.warning("could not check the audit log's signing key: %s", err)
            return
        await self.runtime.set_unhealthy(SERVICE, "")

    async def key_mismatch(self, err: FailedPrecondition) -> None:
        """Called with a call's SIGNING_KEY_MISMATCH: health goes NOT_SERVING."""
        if err.reason == "SIGNING_KEY_MISMATCH":
            await self.runtime.set_unhealthy(SERVICE, err.message)

    def file_bundles(self) -> dict[str, tuple[str, dict[str, BundleSpec]]]:
        """The bundles on disk, by source prefix."""
        out: dict[str, tuple[str, dict[str, BundleSpec]]] = {}
        if self.settings.shipped_policies:
            spec = load_dir(SHIPPED_POLICIES, SHIPPED_BUNDLE, source="shipped:")
            out["shipped:"] = ("shipped:", {SHIPPED_BUNDLE: spec})
        root = self.settings.bundle_dir
        if root is not None:
            specs: dict[str, BundleSpec] = {}
            for name, path in scan_bundle_dir(root).items():
                try:
                    specs[name] = load_tarball(path) if path.is_file() else load_dir(path)
                except (OSError, ValueError) as err:
                    log.error("bundle %s at %s cannot be read: %s", name, path, err)
            out["dir:"] = (f"dir:{root}", specs)
        return out

    async def reload(self) -> None:
        """One pass of the watcher: files to the registry, registry to this replica."""
        for prefix, specs in self.file_bundles().values():
            await self.registry.load_files(specs, prefix)
        await self.registry.sync()

    async def _watch_loop(self) -> None:
        # Stops on a flag rather than on cancellation alone: on Python 3.11 a
        # cancel that races a timeout inside redis-py can be swallowed, and
        # the loop would go on while close() waits for it forever.
        while not self._stopping.is_set():
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reloading policy bundles failed; retrying")
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({stop}, timeout=self.settings.bundle_poll or 1.0)
            stop.cancel()

    async def close(self) -> None:
        """Stop the watcher, flush the decision log, drain the committer."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait({self._watch}, timeout=5.0)
        if self._logger is not None:
            await self._logger.close()
        if self._audit is not None:
            await self._audit.close()


def build(runtime: Runtime) -> PolicyAudit:
    """Read the settings and build the service state."""
    return PolicyAudit(runtime, Settings.from_env(os.environ, runtime.config))
