"""Sub-clients: one object per service, one method object per RPC, built
from the descriptors when first used.

Nothing here names a service or an RPC: ``client.memory`` resolves through
``catalog`` to ``autoecoops.memory.v1.MemoryService`` and every RPC of it
becomes an attribute. The names have static types in ``services.pyi``,
generated from the same descriptors by ``autoecoops.sdk._stubgen``.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor, descriptor_pool

from autoecoops.kernel.mesh.descriptors import method_info
from autoecoops.sdk import catalog
from autoecoops.sdk.calls import AsyncStreamMethod, AsyncUnaryMethod, StreamMethod, UnaryMethod

if TYPE_CHECKING:
    from autoecoops.sdk.transport import AsyncTransport, SyncTransport


class _SubClient:
    """The RPCs of one service as snake_case attributes."""

    _asynchronous = False

    def __init__(self, transport: Any, service: descriptor.ServiceDescriptor) -> None:
        self._transport = transport
        self._service = service
        unary, streaming = (
            (AsyncUnaryMethod, AsyncStreamMethod)
            if self._asynchronous
            else (UnaryMethod, StreamMethod)
        )
        for method in service.methods:
            info = method_info(f"/{service.full_name}/{method.name}")
            if info is None:  # pragma: no cover - the method comes from the same pool
                raise LookupError(
                    f"{service.full_name}/{method.name} is not in the descriptor pool"
                )
            kind = streaming if info.client_streaming or info.server_streaming else unary
            setattr(self, catalog.snake(method.name), kind(transport, info))

    @property
    def service_name(self) -> str:
        """The proto service's full name."""
        return str(self._service.full_name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._service.full_name}>"

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(catalog.snake(m.name) for m in self._service.methods)})


class ServiceClient(_SubClient):
    """The RPCs of one service, for a sync ``Client``."""


class AsyncServiceClient(_SubClient):
    """The RPCs of one service, for an ``AsyncClient``."""

    _asynchronous = True


#: Hand-written helpers that sit beside a service's RPCs, as mixins of its
#: sub-client: service -> (module, sync mixin, async mixin). The typing stub
#: gives the generated classes the same bases.
HELPERS: dict[str, tuple[str, str, str]] = {
    "autoecoops.events.v1.EventBusService": (
        "autoecoops.sdk.events",
        "EventsHelpers",
        "AsyncEventsHelpers",
    ),
}


def helpers(service_name: str, asynchronous: bool) -> tuple[type, ...]:
    """The helper mixins of a service's sub-client (none for most)."""
    entry = HELPERS.get(service_name)
    if entry is None:
        return ()
    module, sync, asyn = entry
    return (getattr(importlib.import_module(module), asyn if asynchronous else sync),)


@functools.cache
def service_class(service_name: str, asynchronous: bool) -> type[_SubClient]:
    """The named sub-client class of a service (``MemoryServiceClient``, ...)."""
    svc = descriptor_pool.Default().FindServiceByName(service_name)
    base = AsyncServiceClient if asynchronous else ServiceClient
    bases = (base, *helpers(service_name, asynchronous))
    return type(catalog.class_name(svc, asynchronous), bases, {"__doc__": base.__doc__})


class _Services:
    """Sub-clients by attribute (``client.memory``) or by full service name."""

    _transport: Any
    _asynchronous = False

    def __init__(self) -> None:
        self._subclients: dict[str, _SubClient] = {}

    def service(self, name: str) -> Any:
        """The sub-client of the proto service ``name`` (``package.Service``),
        including services this SDK version has never heard of."""
        sub = self._subclients.get(name)
        if sub is None:
            try:
                svc = descriptor_pool.Default().FindServiceByName(name)
            except KeyError:
                raise LookupError(
                    f"no service {name!r} is loaded: import its generated _pb2 module first"
                ) from None
            sub = service_class(name, self._asynchronous)(self._transport, svc)
            self._subclients[name] = sub
        return sub

    if not TYPE_CHECKING:
        # Run time only: to the type checker, the services are the properties
        # of services.pyi, so a misspelt one is an error rather than Any.

        def __getattr__(self, name: str) -> Any:
            svc = catalog.find(name)
            if svc is None:
                raise AttributeError(
                    f"{type(self).__name__} has no service {name!r}; services: "
                    + ", ".join(attr for attr, _ in catalog.all_services())
                )
            sub = self.service(svc.full_name)
            # Found once; later lookups are plain attribute reads.
            self.__dict__[name] = sub
            return sub


class Services(_Services):
    """The sub-client of each service of a sync ``Client``."""

    _transport: SyncTransport


class AsyncServices(_Services):
    """The sub-client of each service of an ``AsyncClient``."""

    _transport: AsyncTransport
    _asynchronous = True
