"""The REST gateway: HTTP/JSON <-> gRPC transcoding for every RPC of the mesh,
driven by the ``google.api.http`` rules of the protos, and the OpenAPI 3.1
document generated from the same rules. See docs/gateway.md.

The server parts (uvicorn, the mesh runtime) load on first use, so the
OpenAPI generator can import the rules and the document builder alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoecoops.gateway.server import GatewayServer, MeshWithGateway, start_gateway
    from autoecoops.gateway.settings import GatewaySettings

__all__ = ["GatewayServer", "GatewaySettings", "MeshWithGateway", "start_gateway"]


def __getattr__(name: str) -> Any:
    if name == "GatewaySettings":
        from autoecoops.gateway.settings import GatewaySettings

        return GatewaySettings
    if name in ("GatewayServer", "MeshWithGateway", "start_gateway"):
        from autoecoops.gateway import server

        return getattr(server, name)
    raise AttributeError(f"module 'autoecoops.gateway' has no attribute {name!r}")
