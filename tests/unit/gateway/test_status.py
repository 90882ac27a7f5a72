"""The google.rpc.Status body: backend details kept as sent, unknown types included."""

from __future__ import annotations

import base64
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from autoecoops.gateway.status import from_rpc_error, status_json


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[Any, ...]) -> None:
        self._c, self._d, self._t = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._c

    def details(self) -> str:
        return self._d

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._t


def test_status_keeps_details_of_unknown_types() -> None:
    status = status_pb2.Status(code=9, message="no")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="R"))
    unknown = status.details.add()
    unknown.type_url = "type.googleapis.com/acme.Secret"
    unknown.value = b"\x01\x02"
    err = _Err(
        grpc.StatusCode.FAILED_PRECONDITION,
        "no",
        (("grpc-status-details-bin", status.SerializeToString()),),
    )
    body = status_json(from_rpc_error(err))
    assert body["code"] == 9
    assert body["details"][0]["reason"] == "R"
    assert body["details"][1] == {
        "@type": "type.googleapis.com/acme.Secret",
        "value": base64.b64encode(b"\x01\x02").decode(),
    }


def test_status_without_details_or_with_a_mismatched_trailer() -> None:
    other = status_pb2.Status(code=5, message="stale").SerializeToString()
    err = _Err(grpc.StatusCode.INTERNAL, "real", (("grpc-status-details-bin", other),))
    assert status_json(from_rpc_error(err)) == {"code": 13, "message": "real", "details": []}
