"""The error model: every class maps to its code and round-trips its details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from autoecoops.kernel.mesh import errors
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, FieldViolation

ALL = [
    c
    for c in vars(errors).values()
    if isinstance(c, type) and issubclass(c, AutoEcoOpsError) and c is not AutoEcoOpsError
]


def test_every_grpc_error_code_has_exactly_one_class() -> None:
    codes = [c.code for c in ALL]
    assert sorted(codes, key=lambda c: c.value[0]) == [
        c for c in grpc.StatusCode if c != grpc.StatusCode.OK
    ]
    for cls in ALL:
        assert AutoEcoOpsError.class_for(cls.code) is cls


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_status_round_trip_keeps_class_and_details(cls: type[AutoEcoOpsError]) -> None:
    err = cls(
        "boom",
        reason="SOMETHING_BAD",
        metadata={"k": "v"},
        field_violations=[FieldViolation("a.b", "is wrong")],
        retry_delay=1.5,
        resource_type="role",
        resource_name="admin",
    )
    status = err.to_status()
    assert status.code == cls.code.value[0]
    back = AutoEcoOpsError.from_status(status, trace_id="t1")
    assert type(back) is cls
    assert (back.message, back.reason, back.metadata) == ("boom", "SOMETHING_BAD", {"k": "v"})
    assert back.field_violations == (FieldViolation("a.b", "is wrong"),)
    assert back.retry_delay == pytest.approx(1.5)
    assert (back.resource_type, back.resource_name, back.trace_id) == ("role", "admin", "t1")


def test_status_carries_error_info_with_domain_and_default_reason() -> None:
    status = errors.NotFound("no role 'x'").to_status()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("NOT_FOUND", errors.DOMAIN)
    # Only ErrorInfo: no empty BadRequest/RetryInfo noise.
    assert len(status.details) == 1
