"""The typed surface of the sub-clients.

At run time everything comes from the descriptors (``subclients``);
``services.pyi`` beside this file gives each service and RPC its static
types. It is generated: ``python -m autoecoops.sdk._stubgen``.
"""

from __future__ import annotations

from typing import Any

from autoecoops.sdk.subclients import (
    AsyncServiceClient,
    AsyncServices,
    ServiceClient,
    Services,
    service_class,
)

__all__ = ["AsyncServiceClient", "AsyncServices", "ServiceClient", "Services"]


def __getattr__(name: str) -> Any:
    """``MemoryServiceClient`` and friends, by the names the stub gives them."""
    from autoecoops.sdk import catalog

    if not name.endswith("Client") or name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for _, svc in catalog.all_services():
        for asynchronous in (False, True):
            if catalog.class_name(svc, asynchronous) == name:
                return service_class(svc.full_name, asynchronous)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
