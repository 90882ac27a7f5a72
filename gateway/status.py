"""google.rpc.Status on HTTP: grpc-gateway's code -> status table and the JSON body.

Backend errors keep every detail the service sent (the ``grpc-status-details-bin``
trailer is decoded as is, not rebuilt); errors the gateway itself raises use the
mesh's exception classes, so they carry the same ErrorInfo domain.
"""

from __future__ import annotations

import base64
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

from autoecoops.kernel.mesh.errors import status_of

#: gRPC code -> HTTP status, as grpc-gateway maps them (DESIGN.md "Errors").
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a Status (UNKNOWN for a number gRPC does not define)."""
    return _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)


def http_status(status: status_pb2.Status) -> int:
    """The HTTP status for a google.rpc.Status."""
    return HTTP_STATUS.get(code_of(status), 500)


def from_rpc_error(err: grpc.RpcError) -> status_pb2.Status:
    """The Status a backend returned, with its details when it sent them."""
    return status_of(err)


def status_json(status: status_pb2.Status) -> dict[str, Any]:
    """The Status as JSON: ``code``, ``message``, ``details`` (each with ``@type``).

    A detail of a type this process does not know is kept as ``@type`` plus
    its base64 ``value``, rather than dropped or failing the whole response.
    """
    details = []
    for any_detail in status.details:
        try:
            details.append(
                json_format.MessageToDict(any_detail, always_print_fields_with_no_presence=True)
            )
        except (TypeError, KeyError, json_format.Error):
            details.append(
                {
                    "@type": any_detail.type_url,
                    "value": base64.b64encode(any_detail.value).decode("ascii"),
                }
            )
    return {"code": status.code, "message": status.message, "details": details}
