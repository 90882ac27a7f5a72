"""Prometheus metrics of the mesh's gRPC servers."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

HANDLED = Counter(
    "autoecoops_grpc_server_handled_total",
    "RPCs completed on the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
LATENCY = Histogram(
    "autoecoops_grpc_server_handling_seconds",
    "Time from the start of an RPC's handling to its end, by method.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class MethodMetrics:
    """The label-bound series of one method, resolved once instead of per call."""

    __slots__ = ("_handled", "_latency", "_method", "_service")

    def __init__(self, path: str) -> None:
        service, _, method = path.lstrip("/").partition("/")
        self._service, self._method = service, method
        self._latency = LATENCY.labels(service, method)
        self._handled: dict[str, Counter] = {}

    def observe(self, code: str, seconds: float) -> None:
        """Count one finished call with its status code name and duration."""
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = HANDLED.labels(self._service, self._method, code)
        counter.inc()
        self._latency.observe(seconds)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``port`` (a daemon thread; one per process)."""
    start_http_server(port, addr=host)
