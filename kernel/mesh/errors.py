"""The one exception tree of AutoEcoOps, and its mapping to google.rpc.Status.

Servers raise these; the error boundary (``interceptors.py``) turns them into
a Status with details. The SDK turns a ``grpc.RpcError`` back into the same
classes (``from_rpc_error``), so a caller catches ``NotFound`` whether the
error came from this process or across the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

#: The ErrorInfo domain of every error this project raises.
DOMAIN = "autoecoops.io"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (``role.name``) and what is wrong."""

    field: str
    description: str


class AutoEcoOpsError(Exception):
    """Base of every AutoEcoOps error; carries a gRPC code and google.rpc details."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    #: The default ErrorInfo reason, UPPER_SNAKE_CASE.
    default_reason: ClassVar[str] = "UNKNOWN"
    _by_code: ClassVar[dict[grpc.StatusCode, type[AutoEcoOpsError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The code -> class table fills itself as classes are defined; the
        # first class for a code is its canonical one.
        AutoEcoOpsError._by_code.setdefault(cls.code, cls)

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
        resource_type: str = "",
        resource_name: str = "",
        trace_id: str = "",
        domain: str = DOMAIN,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        #: The ErrorInfo domain: who defines ``reason`` (ours, or an upstream's).
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        #: Seconds the server asks the client to wait before retrying.
        self.retry_delay = retry_delay
        self.resource_type = resource_type
        self.resource_name = resource_name
        #: The trace id of the failed call, for quoting in a bug report.
        self.trace_id = trace_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status with ErrorInfo and whichever other details apply."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain, metadata=self.metadata
        )
        status.details.add().Pack(info)
        if self.field_violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.field_violations
                ]
            )
            status.details.add().Pack(bad)
        if self.retry_delay is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.resource_type or self.resource_name:
            status.details.add().Pack(
                error_details_pb2.ResourceInfo(
                    resource_type=self.resource_type, resource_name=self.resource_name
                )
            )
        return status

    @staticmethod
    def class_for(code: grpc.StatusCode) -> type[AutoEcoOpsError]:
        """The exception class for a gRPC code (``Unknown`` if none is defined)."""
        return AutoEcoOpsError._by_code.get(code, Unknown)

    @classmethod
    def from_status(cls, status: status_pb2.Status, trace_id: str = "") -> AutoEcoOpsError:
        """Rebuild the most specific error from a google.rpc.Status."""
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        kwargs: dict[str, Any] = {"trace_id": trace_id}
        violations: list[FieldViolation] = []
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                kwargs["reason"] = info.reason
                kwargs["domain"] = info.domain
                kwargs["metadata"] = dict(info.metadata)
            elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                any_detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                kwargs["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
            elif any_detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                res = error_details_pb2.ResourceInfo()
                any_detail.Unpack(res)
                kwargs["resource_type"] = res.resource_type
                kwargs["resource_name"] = res.resource_name
        return AutoEcoOpsError.class_for(code)(
            status.message, field_violations=violations, **kwargs
        )


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status of a failed call (sync or aio): the one the server
    sent in its ``grpc-status-details-bin`` trailer, read by grpcio-status,
    else one of the call's code and message alone (no trailer, or a garbled
    one that contradicts the call's status)."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, DecodeError):
        status = None
    if status is not None:
        return status
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    return status_pb2.Status(code=code.value[0], message=error.details() or "")  # type: ignore[attr-defined]


def from_rpc_error(error: grpc.RpcError, trace_id: str = "") -> AutoEcoOpsError:
    """Convert a ``grpc.RpcError`` (sync or aio) into the matching AutoEcoOpsError.

    This is the one place wire errors become library errors: the details come
    from the ``grpc-status-details-bin`` trailer when the server sent one.
    """
    return AutoEcoOpsError.from_status(status_of(error), trace_id=trace_id)


class Cancelled(AutoEcoOpsError):
    """The caller cancelled the call."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unknown(AutoEcoOpsError):
    """An error the server could not classify."""

    code = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"


class InvalidArgument(AutoEcoOpsError):
    """The request is malformed or a field is invalid."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class DeadlineExceeded(AutoEcoOpsError):
    """The call's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class NotFound(AutoEcoOpsError):
    """The named resource does not exist (or the caller may not know it does)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(AutoEcoOpsError):
    """A resource with that name already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(AutoEcoOpsError):
    """The caller is authenticated but lacks the permission."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(AutoEcoOpsError):
    """A quota, rate or size limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(AutoEcoOpsError):
    """The system is not in a state the call needs."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(AutoEcoOpsError):
    """The call lost a concurrency conflict; retrying the whole operation may work."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class OutOfRange(AutoEcoOpsError):
    """A value is past the valid range (e.g. an index past the tree size)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Unimplemented(AutoEcoOpsError):
    """The method exists in the contract but is not served (yet)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(AutoEcoOpsError):
    """A bug or invariant failure on the server; details are in its logs."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


class Unavailable(AutoEcoOpsError):
    """The service or one of its dependencies is down; retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(AutoEcoOpsError):
    """Unrecoverable data loss or corruption."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unauthenticated(AutoEcoOpsError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ConfigError(Exception):
    """Invalid configuration at start; the message is one line naming the variable."""
