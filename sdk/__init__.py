"""The Python SDK of AutoEcoOps: one client for the whole mesh.

    from autoecoops.sdk import Client, LocalToken

    with Client(credentials=LocalToken("alice", roles=("admin",))) as client:
        hits = client.memory.search(namespace="runbooks", query="disk pressure")

See sdk/README.md for connecting, credentials, retries, tracing and errors.
"""

from autoecoops.sdk.calls import AsyncStream, CallInfo, Stream
from autoecoops.sdk.channels import TLS
from autoecoops.sdk.client import AsyncClient, Client
from autoecoops.sdk.clock import Clock
from autoecoops.sdk.credentials import (
    ClientCredentials,
    Credentials,
    LocalToken,
    StaticToken,
    TokenExchange,
)
from autoecoops.sdk.errors import (
    AutoEcoOpsError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from autoecoops.sdk.retry import DEFAULT_RETRY, NO_RETRY, Retry, RetryThrottle

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "TLS",
    "AsyncClient",
    "AsyncStream",
    "AutoEcoOpsError",
    "CallInfo",
    "Client",
    "ClientCredentials",
    "Clock",
    "Credentials",
    "FieldViolation",
    "InvalidArgument",
    "LocalToken",
    "NotFound",
    "PermissionDenied",
    "Retry",
    "RetryThrottle",
    "StaticToken",
    "Stream",
    "TokenExchange",
    "Unauthenticated",
    "Unavailable",
]
