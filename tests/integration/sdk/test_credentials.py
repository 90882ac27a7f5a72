"""The four credential kinds against the real auth-service: client
credentials refreshed before expiry with one IssueToken however many calls
wait, token exchange with an actor, the local key ring, and a static token."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import grpc
import jwt
import pytest

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth import service as auth_service
from autoecoops.kernel.mesh.errors import ConfigError, Unauthenticated
from autoecoops.kernel.mesh.server import Mesh, Runtime
from autoecoops.sdk import (
    AsyncClient,
    Client,
    ClientCredentials,
    LocalToken,
    StaticToken,
    TokenExchange,
)
from tests.conftest import MintToken, StartMesh
from tests.integration.sdk.scripted import AUTH, FakeClock


class CountingAuth(auth_service.AuthServicer):
    """The real AuthService, recording the token requests it answers."""

    def __init__(self, authority: Any, log: dict[str, list[Any]]) -> None:
        super().__init__(authority)
        self.log = log

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        reply = await super().IssueToken(request, context)
        self.log["IssueToken"].append(reply)
        return reply

    async def ExchangeToken(
        self, request: auth_pb2.ExchangeTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ExchangeTokenResponse:
        reply = await super().ExchangeToken(request, context)
        self.log["ExchangeToken"].append((request, reply))
        return reply


async def counting_mesh(start_mesh: StartMesh) -> tuple[Mesh, dict[str, list[Any]]]:
    log: dict[str, list[Any]] = {"IssueToken": [], "ExchangeToken": []}

    def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
        authority = auth_service.build_authority(runtime)
        runtime.starters.append(lambda: authority.start(None))
        runtime.closers.append(authority.close)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(CountingAuth(authority, log), server)
        return [AUTH]

    # policy-audit: IssueToken and ExchangeToken are audited, synchronously.
    mesh = await start_mesh(
        ["auth-service", "policy-audit"], {"auth-service": register}, secure=True
    )
    return mesh, log


async def service_account(mesh: Mesh, mint_token: MintToken, name: str) -> ClientCredentials:
    admin = StaticToken(mint_token("root", ["admin"]))
    async with AsyncClient(config=mesh.config, credentials=admin) as sdk:
        created = await sdk.auth.create_service_account(
            service_account=auth_pb2.ServiceAccount(name=name, roles=["viewer"])
        )
    return ClientCredentials(name, created.client_secret)


async def test_client_credentials_refresh_before_expiry_with_one_request_for_all_waiters(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh, log = await counting_mesh(start_mesh)
    creds = await service_account(mesh, mint_token, "sdk-refresh")
    fake = FakeClock()
    async with AsyncClient(config=mesh.config, credentials=creds, clock=fake.clock()) as sdk:
        replies = await asyncio.gather(*(sdk.auth.list_roles() for _ in range(20)))
        assert all(r.roles for r in replies)
        assert len(log["IssueToken"]) == 1
        expires = log["IssueToken"][0].expire_time.ToSeconds()
        # Still 2 minutes from expiry (the margin is 1): the token is kept.
        fake.offset = expires - 120 - fake.time() + fake.offset
        await asyncio.gather(*(sdk.auth.list_roles() for _ in range(20)))
        assert len(log["IssueToken"]) == 1
        # 30 s from expiry: replaced before it lapses, by one request for all 20 calls.
        fake.offset = expires - 30 - fake.time() + fake.offset
        await asyncio.gather(*(sdk.auth.list_roles() for _ in range(20)))
        assert len(log["IssueToken"]) == 2


async def test_the_sync_client_refreshes_once_for_many_threads(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh, log = await counting_mesh(start_mesh)
    creds = await service_account(mesh, mint_token, "sdk-threads")

    def run() -> None:
        with (
            Client(config=mesh.config, credentials=creds) as sdk,
            ThreadPoolExecutor(8) as pool,
        ):
            replies = list(pool.map(lambda _: sdk.auth.list_roles(), range(16)))
        assert all(r.roles for r in replies)

    await asyncio.to_thread(run)
    assert len(log["IssueToken"]) == 1


async def test_token_exchange_acts_for_the_subject(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh, log = await counting_mesh(start_mesh)
    actor = await service_account(mesh, mint_token, "sdk-actor")
    alice = mint_token("alice", ["viewer"])
    creds = TokenExchange(subject_token=lambda: alice, audience="auth-service", actor=actor)
    async with AsyncClient(config=mesh.config, credentials=creds) as sdk:
        roles = await sdk.auth.list_roles()
    assert roles.roles
    ((request, reply),) = log["ExchangeToken"]
    assert request.subject_token == alice and request.actor_token
    claims = jwt.decode(reply.access_token, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["act"]["sub"] == "sdk-actor"
    assert claims["aud"] == "auth-service"


async def test_local_token_signs_with_the_meshs_key_ring(
    start_mesh: StartMesh, tmp_path: object
) -> None:
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    creds = LocalToken("dev", roles=("viewer",), data_dir=mesh.config.data_dir)
    async with AsyncClient(config=mesh.config, credentials=creds) as sdk:
        assert (await sdk.auth.list_roles()).roles
    with Client(config=mesh.config, credentials=creds) as sync:
        assert (await asyncio.to_thread(sync.auth.list_roles)).roles


async def test_static_token_and_no_token(start_mesh: StartMesh, mint_token: MintToken) -> None:
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    token = StaticToken(mint_token("bob", ["viewer"]))
    async with AsyncClient(config=mesh.config, credentials=token) as sdk:
        assert (await sdk.auth.list_roles()).roles
    async with AsyncClient(config=mesh.config) as anonymous:
        with pytest.raises(Unauthenticated) as info:
            await anonymous.auth.list_roles()
        assert info.value.reason == "CREDENTIALS_MISSING"
        # Public RPCs need none.
        assert (await anonymous.auth.get_jwks()).keys


async def test_a_rejected_static_token_is_not_retried(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    expired = StaticToken(mint_token("bob", ["viewer"], ttl=-3600))
    async with AsyncClient(config=mesh.config, credentials=expired) as sdk:
        with pytest.raises(Unauthenticated) as info:
            await sdk.auth.list_roles()
    assert info.value.reason and info.value.trace_id


def test_credentials_never_travel_in_clear_text_beyond_loopback() -> None:
    creds = StaticToken("t")
    with (
        Client(addresses={"auth-service": "10.1.2.3:4001"}, credentials=creds, tls=False) as sdk,
        pytest.raises(ConfigError, match="without TLS"),
    ):
        sdk.auth.list_roles()
    with Client(
        addresses={"auth-service": "10.1.2.3:4001"},
        credentials=creds,
        tls=False,
        allow_insecure_credentials=True,
        timeout=timedelta(milliseconds=1),
    ) as sdk:
        # Allowed explicitly: the call goes out (and finds nobody there).
        with pytest.raises(Exception) as info:
            sdk.auth.list_roles()
        assert not isinstance(info.value, ConfigError)
