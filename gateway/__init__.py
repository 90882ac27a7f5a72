"""The REST gateway: HTTP/JSON <-> gRPC transcoding for every RPC of the mesh,
driven by the ``google.api.http`` rules of the protos, and the OpenAPI 3.1
document generated from the same rules. See docs/gateway.md."""

from autoecoops.gateway.server import GatewayServer, MeshWithGateway, start_gateway
from autoecoops.gateway.settings import GatewaySettings

__all__ = ["GatewayServer", "GatewaySettings", "MeshWithGateway", "start_gateway"]
