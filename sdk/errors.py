"""The SDK's exceptions: the project's one tree (``kernel/mesh/errors.py``).

Every failed call raises an ``AutoEcoOpsError`` subclass, one per gRPC code,
carrying ``code``, ``message``, the ErrorInfo ``reason`` and ``metadata``,
``field_violations``, ``retry_delay``, ``resource_type``/``resource_name``
and the call's ``trace_id``. They are the servers' own classes, converted
from the wire in one place (``from_rpc_error``).
"""

from autoecoops.kernel.mesh.errors import (
    Aborted,
    AlreadyExists,
    AutoEcoOpsError,
    Cancelled,
    ConfigError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AutoEcoOpsError",
    "Cancelled",
    "ConfigError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
]
