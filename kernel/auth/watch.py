"""RBAC as a pushed, versioned snapshot (WatchAuthorization), both ends.

The server end, ``watch_events``, is what Kubernetes' API server does for an
informer: a consistent snapshot of roles and bindings at version V (or, for a
watcher resuming from V that the change log still covers, a bookmark at V),
then every change after V in order, and a bookmark when idle so the watcher
knows the stream is alive. A watcher that fell behind the log's retention is
sent a fresh snapshot instead of a gap.

The client end, ``RbacState``, is the informer's store: it applies those
events and hands out an immutable ``Policy`` that authorizers answer from.
Neither knows gRPC or Redis beyond ``AuthStore``'s methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from autoecoops.kernel.auth.rbac import BUILTIN_ROLES, Binding, Policy, Role
from autoecoops.kernel.auth.store import AuthStore, Change


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every role and binding at ``version``."""

    version: int
    roles: tuple[Role, ...]
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class Bookmark:
    """Nothing new: the watcher is current at ``version``."""

    version: int


WatchEvent = Snapshot | Change | Bookmark

#: Seconds one blocking read of the change log waits: under redis-py's default
#: 5 s socket timeout, which would otherwise cut every idle read short.
_BLOCK = 4.0


async def _snapshot(store: AuthStore) -> Snapshot:
    version, policy = await store.policy()
    return Snapshot(version, tuple(policy.roles.values()), tuple(policy.bindings))


async def _until(stop: asyncio.Event, work: asyncio.Future[Any]) -> list[Change] | None:
    """``work``'s result, or None (and ``work`` cancelled) once ``stop`` is set."""
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    # Whatever ends this wait (stop, the watcher hanging up), ``work``'s
    # outcome is consumed, so a read cut short is never a stray task error.
    work.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not work.done():
            work.cancel()
    if work in done:
        result: list[Change] = work.result()
        return result
    return None


async def watch_events(
    store: AuthStore, resume: int, stop: asyncio.Event, idle: float = 15.0
) -> AsyncIterator[WatchEvent]:
    """The events of one watch, until ``stop`` is set (auth-service draining)."""
    current = await store.rbac_version()
    if 0 < resume <= current:
        oldest = await store.oldest_change() if resume < current else None
        covered = resume == current or (oldest is not None and oldest <= resume + 1)
    else:
        covered = False
    if covered:
        last = resume
        yield Bookmark(last)
    else:
        snap = await _snapshot(store)
        last = snap.version
        yield snap
    quiet_since = time.monotonic()
    while not stop.is_set():
        changes = await _until(stop, asyncio.ensure_future(store.changes_after(last, block=_BLOCK)))
        if changes is None:
            return
        if not changes:
            if time.monotonic() - quiet_since >= idle:
                quiet_since = time.monotonic()
                yield Bookmark(last)
            continue
        quiet_since = time.monotonic()
        if changes[0].version != last + 1:
            # The log was trimmed past this watcher: start it over from a snapshot.
            snap = await _snapshot(store)
            last = snap.version
            yield snap
            continue
        for change in changes:
            last = change.version
            yield change


class RbacState:
    """A watcher's copy of roles and bindings, and the Policy built from it."""

    def __init__(self) -> None:
        self.version = 0
        self._roles: dict[str, Role] = {}
        self._bindings: dict[str, Binding] = {}
        #: None until the first snapshot (or a resume of one) arrived: fail closed.
        self.policy: Policy | None = None

    def apply(self, event: WatchEvent) -> None:
        """Apply one event of the stream."""
        if isinstance(event, Snapshot):
            self._roles = {r.name: r for r in event.roles}
            self._bindings = {b.name: b for b in event.bindings}
        elif isinstance(event, Change):
            table: dict[str, Role] | dict[str, Binding]
            table = self._roles if event.kind == "role" else self._bindings
            if event.value is None:
                table.pop(event.name, None)
            else:
                table[event.name] = event.value  # type: ignore[assignment]
        elif self.policy is None:
            # A bookmark before any snapshot means nothing: we have no state to be current with.
            return
        self.version = event.version
        self.policy = build_policy(self._roles.values(), self._bindings.values())


def build_policy(roles: Iterable[Role], bindings: Iterable[Binding]) -> Policy:
    """The Policy of stored roles over the built-in ones, and the bindings."""
    table = {r.name: r for r in BUILTIN_ROLES}
    table.update((r.name, r) for r in roles)
    return Policy(table, tuple(bindings))
