"""A scripted AuthService for the SDK's tests, and a clock whose waits are instant.

Three public RPCs with different contracts drive the retry tests:
GetJwks and GetOpenIdConfiguration are idempotent, IssueToken is not. Each
call records what the server saw (time remaining, trace id, metadata) and
then plays the next outcome of its script: an exception to raise, a number
of seconds to stall, or None to answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.sdk.clock import Clock

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
Outcome = BaseException | float | None


@dataclass(frozen=True)
class Seen:
    """One attempt as the server saw it."""

    remaining: float | None
    trace_id: str
    metadata: dict[str, str]


class Scripted(auth_pb2_grpc.AuthServiceServicer):
    """AuthService whose public RPCs follow a script and record every attempt."""

    PENDING = "not part of the SDK's scripted test servicer"

    def __init__(self) -> None:
        self.seen: dict[str, list[Seen]] = defaultdict(list)
        self.script: dict[str, list[Outcome]] = defaultdict(list)
        #: Played when a method's script has run out.
        self.default: dict[str, Outcome] = {}
        #: Set once any call has arrived.
        self.arrived = asyncio.Event()

    async def _play(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.seen[method].append(Seen(context.time_remaining(), current_trace_id(), metadata))
        self.arrived.set()
        script = self.script[method]
        outcome = script.pop(0) if script else self.default.get(method)
        if isinstance(outcome, int | float):
            await asyncio.sleep(outcome)
        elif outcome is not None:
            raise outcome

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        await self._play("GetJwks", context)
        # The server's own view of the trace, for comparing with the client's.
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.JsonWebKey(kid=current_trace_id())])

    async def GetOpenIdConfiguration(
        self, request: auth_pb2.GetOpenIdConfigurationRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetOpenIdConfigurationResponse:
        await self._play("GetOpenIdConfiguration", context)
        return auth_pb2.GetOpenIdConfigurationResponse(issuer="scripted")

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        await self._play("IssueToken", context)
        return auth_pb2.IssueTokenResponse(access_token=request.client_id)


def serve(servicer: Scripted) -> object:
    """A ``registers=`` entry that serves ``servicer`` as auth-service."""

    def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
        auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
        return [AUTH]

    return register


class FakeClock:
    """Real time, plus the waits the client asked for, which return at once."""

    def __init__(self, random: float = 0.5) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []
        self._random = random

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset

    def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.offset += delay

    async def async_sleep(self, delay: float) -> None:
        self.sleep(delay)

    def clock(self) -> Clock:
        return Clock(
            monotonic=self.monotonic,
            time=self.time,
            random=lambda: self._random,
            sleep=self.sleep,
            async_sleep=self.async_sleep,
        )
