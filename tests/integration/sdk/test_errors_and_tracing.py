"""An error's details arrive intact in the SDK's exception, and every call
and error carries the trace id the server's span has."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import trace

from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from autoecoops.sdk import NO_RETRY, AsyncClient, Client
from tests.conftest import StartMesh
from tests.integration.sdk.scripted import Scripted, serve


async def test_error_details_round_trip_from_server_to_exception(start_mesh: StartMesh) -> None:
    server = Scripted()
    mesh = await start_mesh(["auth-service"], {"auth-service": serve(server)})
    server.script["GetJwks"] = [
        InvalidArgument(
            "bad request",
            reason="BAD_SELECTOR",
            metadata={"selector": "a=b"},
            field_violations=[
                FieldViolation("selector", "unknown label"),
                FieldViolation("k", "<0"),
            ],
        ),
        NotFound("no such key", resource_type="jwk", resource_name="kid-1"),
        Unavailable("busy", reason="BACKEND_DOWN", retry_delay=2.5),
        FailedPrecondition("not yet", reason="KEY_PENDING"),
    ]
    async with AsyncClient(config=mesh.config, retry=NO_RETRY) as sdk:
        errors: list[AutoEcoOpsError] = []
        for _ in range(4):
            with pytest.raises(AutoEcoOpsError) as info:
                await sdk.auth.get_jwks()
            errors.append(info.value)
    bad, missing, busy, pending = errors
    assert isinstance(bad, InvalidArgument) and bad.code.name == "INVALID_ARGUMENT"
    assert bad.message == "bad request" and bad.reason == "BAD_SELECTOR"
    assert bad.domain == "autoecoops.io"
    assert bad.metadata["selector"] == "a=b"
    assert bad.field_violations == (
        FieldViolation("selector", "unknown label"),
        FieldViolation("k", "<0"),
    )
    assert isinstance(missing, NotFound)
    assert (missing.resource_type, missing.resource_name) == ("jwk", "kid-1")
    assert isinstance(busy, Unavailable) and busy.retry_delay == 2.5
    assert busy.reason == "BACKEND_DOWN"
    assert isinstance(pending, FailedPrecondition) and pending.reason == "KEY_PENDING"
    # The server wrote its trace id into the details; the SDK's matches it.
    for error, seen in zip(errors, server.seen["GetJwks"], strict=True):
        assert len(error.trace_id) == 32
        assert error.trace_id == error.metadata["trace_id"] == seen.trace_id


async def test_every_response_carries_the_trace_id_of_the_servers_span(
    start_mesh: StartMesh,
) -> None:
    server = Scripted()
    mesh = await start_mesh(["auth-service"], {"auth-service": serve(server)})
    async with AsyncClient(config=mesh.config) as sdk:
        calls = [await sdk.auth.get_jwks.with_call() for _ in range(3)]
    for (reply, call), seen in zip(calls, server.seen["GetJwks"], strict=True):
        assert call.trace_id == reply.keys[0].kid == seen.trace_id
        assert seen.metadata["traceparent"].split("-")[1] == call.trace_id
    # Each call is its own trace.
    assert len({call.trace_id for _, call in calls}) == 3


async def test_a_call_inside_the_callers_span_joins_its_trace(start_mesh: StartMesh) -> None:
    server = Scripted()
    mesh = await start_mesh(["auth-service"], {"auth-service": serve(server)})
    tracer = trace.get_tracer("test")
    async with AsyncClient(config=mesh.config) as sdk:
        with tracer.start_as_current_span("user operation") as span:
            _, first = await sdk.auth.get_jwks.with_call()
            _, second = await sdk.auth.get_open_id_configuration.with_call()
    mine = format(span.get_span_context().trace_id, "032x")
    assert first.trace_id == second.trace_id == mine
    assert {s.trace_id for s in server.seen["GetJwks"]} == {mine}


async def test_the_sync_client_reports_trace_ids_too(start_mesh: StartMesh) -> None:
    server = Scripted()
    mesh = await start_mesh(["auth-service"], {"auth-service": serve(server)})
    server.script["GetOpenIdConfiguration"] = [NotFound("gone")]

    def run() -> tuple[str, str]:
        with Client(config=mesh.config) as sdk:
            reply, call = sdk.auth.get_jwks.with_call()
            assert reply.keys[0].kid == call.trace_id
            with pytest.raises(NotFound) as info:
                sdk.auth.get_open_id_configuration()
            return call.trace_id, info.value.trace_id

    ok, failed = await asyncio.to_thread(run)
    assert ok == server.seen["GetJwks"][0].trace_id
    assert failed == server.seen["GetOpenIdConfiguration"][0].trace_id
