"""memory-hub fixtures: the real model loaded once per session, hubs on a real Redis."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from autoecoops.kernel.memory_hub.embedder import load_model
from autoecoops.kernel.memory_hub.hub import MemoryHub
from autoecoops.kernel.memory_hub.replica import snapshot_dir
from autoecoops.kernel.memory_hub.settings import DEFAULT_MODEL, MemoryHubSettings
from autoecoops.kernel.memory_hub.store import MemoryStore
from autoecoops.kernel.mesh.redis import connect
from tests.conftest import base_key

MakeHub = Callable[..., Awaitable[MemoryHub]]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The packaged all-MiniLM-L6-v2, loaded once: every hub in the session shares it."""
    path = MemoryHubSettings().models[DEFAULT_MODEL]
    load_model(path)
    return path


@pytest.fixture
async def make_hub(
    redis_url: str, key_prefix: str, tmp_path: Path, model_path: Path
) -> AsyncIterator[MakeHub]:
    """``await make_hub(data_dir=..., start=True, **settings)``: a hub (a replica,
    as another process would run it) over this test's key prefix."""
    made: list[tuple[MemoryHub, Any]] = []

    async def make(
        data_dir: Path | None = None, start: bool = False, **overrides: Any
    ) -> MemoryHub:
        client = connect(redis_url)
        overrides.setdefault("follow_interval", 600.0)  # tests drive syncs themselves
        settings = dataclasses.replace(MemoryHubSettings(), **overrides)
        store = MemoryStore(
            client, base_key(redis_url, key_prefix, "memory-hub"), settings.change_log_len
        )
        hub = MemoryHub(store, settings, snapshot_dir(data_dir or tmp_path, key_prefix))
        if start:
            await hub.start()
        made.append((hub, client))
        return hub

    yield make
    for hub, client in made:
        await hub.close()
        await client.aclose()
