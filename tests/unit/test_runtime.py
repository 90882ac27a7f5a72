"""The shared runtime against real grpc.aio servers on loopback: the error
boundary, auth gate, validation, size limits, deadline and trace propagation,
and graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.service import AuthServicer
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY, NotFound
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.kernel.mesh.server import Mesh, Runtime
from tests.conftest import StartMesh, make_config

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class ProbeServicer(AuthServicer):
    """AuthService with test behaviour on a few public methods."""

    def __init__(self, runtime: Runtime | None = None, downstream: str = "") -> None:
        self.runtime = runtime
        self.downstream = downstream

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        if request.client_id == "missing":
            raise NotFound(
                "no such client", resource_type="service-account", resource_name="missing"
            )
        if request.client_id == "crash":
            raise RuntimeError("secret internals: /etc/passwd")
        if request.client_id == "hop" and self.runtime:
            await asyncio.sleep(1.0)
            stub = self.runtime.clients.stub(auth_pb2_grpc.AuthServiceStub, self.downstream)
            seen = await stub.GetOpenIdConfiguration(auth_pb2.GetOpenIdConfigurationRequest())
            return auth_pb2.IssueTokenResponse(
                access_token=seen.issuer, token_type=seen.jwks_uri, scopes=[current_trace_id()]
            )
        return auth_pb2.IssueTokenResponse(access_token=f"len={len(request.client_secret)}")

    async def GetOpenIdConfiguration(
        self, request: auth_pb2.GetOpenIdConfigurationRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetOpenIdConfigurationResponse:
        return auth_pb2.GetOpenIdConfigurationResponse(
            issuer=str(context.time_remaining()), jwks_uri=current_trace_id()
        )

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        await asyncio.sleep(0.6)
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.JsonWebKey(kid="slow")])


def probe(downstream: str = "") -> object:
    def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(ProbeServicer(runtime, downstream), server)
        return [AUTH]

    return register


def channel(mesh: Mesh, name: str = "auth-service") -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(mesh.config.addr(name))


def details(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    return status_pb2.Status.FromString(raw)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    for d in details(err).details:
        if d.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


async def still_serving(ch: grpc.aio.Channel) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(ch)
    reply = await stub.IssueToken(
        auth_pb2.IssueTokenRequest(client_id="a", client_secret="b"), timeout=5
    )
    assert reply.access_token == "len=1"


async def test_domain_error_becomes_status_with_details(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id="missing", client_secret="x")
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "no such client"
        assert error_info(info.value).reason == "NOT_FOUND"
        res = error_details_pb2.ResourceInfo()
        assert any(d.Unpack(res) for d in details(info.value).details)
        assert res.resource_name == "missing"


async def test_handler_that_raises_is_internal_without_a_traceback(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(auth_pb2.IssueTokenRequest(client_id="crash", client_secret="x"))
        err = info.value
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "secret internals" not in err.details()
        assert "Traceback" not in err.details()
        assert "error_id" in err.details()
        meta = error_info(err).metadata
        assert meta["error_id"] in err.details()
        assert len(meta["trace_id"]) == 32
        await still_serving(ch)


async def test_no_credentials_on_a_protected_method_is_unauthenticated(
    start_mesh: StartMesh,
) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.VerifyToken(auth_pb2.VerifyTokenRequest(token="t"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(info.value).reason == "CREDENTIALS_MISSING"
        # A malformed header is named as such, not silently ignored.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.VerifyToken(
                auth_pb2.VerifyTokenRequest(token="t"), metadata=[("authorization", "Basic Zm9v")]
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(info.value).reason == "MALFORMED_AUTHORIZATION"
        await still_serving(ch)


async def test_a_token_is_never_accepted_without_a_verifier(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.VerifyToken(
                auth_pb2.VerifyTokenRequest(token="t"),
                metadata=[("authorization", "Bearer abc.def.ghi")],
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_method_is_unimplemented(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        for path in (f"/{AUTH}/NoSuchMethod", "/autoecoops.nope.v1.NopeService/Get", "/x/y"):
            call = ch.unary_unary(path)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await still_serving(ch)


class PendingServicer(auth_pb2_grpc.AuthServiceServicer):
    """A servicer with nothing implemented yet."""

    PENDING = "it lands with the auth-service issue"


def pending(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    auth_pb2_grpc.add_AuthServiceServicer_to_server(PendingServicer(), server)  # type: ignore[abstract]
    return [AUTH]


async def test_pending_method_says_what_is_missing(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": pending})
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetJwks(auth_pb2.GetJwksRequest())
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "GetJwks is not implemented yet" in info.value.details()
        assert "auth-service issue" in info.value.details()


async def test_oversized_message_is_resource_exhausted(
    start_mesh: StartMesh, tmp_path: object
) -> None:
    cfg = make_config(max_message_bytes=64 * 1024, shutdown_grace=0.5)
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()}, config=cfg)
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id="a", client_secret="x" * 100_000)
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()
        await still_serving(ch)


async def test_malformed_bytes_are_invalid_argument(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        call = ch.unary_unary(f"/{AUTH}/IssueToken")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\x0a\xff\xff\xff")  # a length-delimited field that runs past the end
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(info.value).reason == "MALFORMED_REQUEST"
        await still_serving(ch)


async def test_missing_required_fields_are_field_violations(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()})
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(auth_pb2.IssueTokenRequest(client_id="a"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in details(info.value).details)
        assert [v.field for v in bad.field_violations] == ["client_secret"]


async def test_deadline_and_trace_propagate_to_downstream_calls(start_mesh: StartMesh) -> None:
    mesh = await start_mesh(
        ["auth-service", "event-bus"],
        {"auth-service": probe(downstream="event-bus"), "event-bus": probe()},
    )
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        reply = await stub.IssueToken(
            auth_pb2.IssueTokenRequest(client_id="hop", client_secret="x"), timeout=5.0
        )
    downstream_remaining = float(reply.access_token)
    # The caller gave 5 s and the first hop spent 1 s: the second hop gets what is left.
    assert 3.0 < downstream_remaining < 4.05
    # One trace across both hops.
    assert reply.token_type == reply.scopes[0] and len(reply.token_type) == 32


async def test_expired_deadline_fails_fast_before_the_downstream_call(
    start_mesh: StartMesh,
) -> None:
    mesh = await start_mesh(
        ["auth-service", "event-bus"],
        {"auth-service": probe(downstream="event-bus"), "event-bus": probe()},
    )
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id="hop", client_secret="x"), timeout=0.8
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_graceful_drain_finishes_in_flight_calls_and_reports_not_serving(
    start_mesh: StartMesh,
) -> None:
    cfg = make_config(drain_delay=0.3, shutdown_grace=5.0)
    mesh = await start_mesh(["auth-service"], {"auth-service": probe()}, config=cfg)
    async with channel(mesh) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        assert (
            await health.Check(health_pb2.HealthCheckRequest(service=AUTH))
        ).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(stub.GetJwks(auth_pb2.GetJwksRequest()))
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(mesh.stop())
        await asyncio.sleep(0.1)
        # During the drain delay the port is open but health says NOT_SERVING.
        status = (await health.Check(health_pb2.HealthCheckRequest(service=AUTH))).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await in_flight
        assert reply.keys[0].kid == "slow"
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id="a", client_secret="b"), timeout=1
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
