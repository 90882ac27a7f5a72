"""Token sources without a server: caching, the refresh margin, single
flight, invalidation and the order of an exchange's requests."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import message, timestamp_pb2

from autoecoops.auth.v1 import auth_pb2
from autoecoops.kernel.mesh.errors import Unavailable
from autoecoops.sdk.clock import Clock
from autoecoops.sdk.credentials import (
    EXCHANGE_TOKEN,
    ISSUE_TOKEN,
    AsyncTokenSource,
    ClientCredentials,
    StaticToken,
    TokenExchange,
    TokenSource,
)


class Issuer:
    """Answers token requests like auth-service, on a fake clock."""

    def __init__(self, ttl: float = 900) -> None:
        self.now = 1_000_000.0
        self.ttl = ttl
        self.requests: list[tuple[str, message.Message]] = []
        self.fail_next = 0

    def clock(self) -> Clock:
        return Clock(time=lambda: self.now)

    def reply(self, path: str, request: message.Message) -> Any:
        self.requests.append((path, request))
        if self.fail_next:
            self.fail_next -= 1
            raise Unavailable("auth-service is down")
        expires = timestamp_pb2.Timestamp(seconds=int(self.now + self.ttl))
        token = f"t{len(self.requests)}"
        if path == ISSUE_TOKEN:
            return auth_pb2.IssueTokenResponse(access_token=token, expire_time=expires)
        return auth_pb2.ExchangeTokenResponse(access_token=token, expire_time=expires)

    async def areply(self, path: str, request: message.Message) -> Any:
        await asyncio.sleep(0.01)  # let every waiter pile up behind the lock
        return self.reply(path, request)


CREDS = ClientCredentials("svc", "secret", refresh_margin=timedelta(seconds=60))


def test_a_token_is_reused_until_the_margin_before_expiry() -> None:
    issuer = Issuer(ttl=900)
    source = TokenSource(CREDS, issuer.reply, issuer.clock())
    assert source.token() == "t1"
    issuer.now += 839
    assert source.token() == "t1"
    issuer.now += 1  # 60 s left: replaced before it can lapse mid-call
    assert source.token() == "t2"
    assert [p for p, _ in issuer.requests] == [ISSUE_TOKEN, ISSUE_TOKEN]
    assert issuer.requests[0][1] == CREDS.request()


def test_a_short_lived_token_is_kept_for_half_its_life() -> None:
    # A 30 s token with a 60 s margin would otherwise be fetched on every call.
    issuer = Issuer(ttl=30)
    source = TokenSource(CREDS, issuer.reply, issuer.clock())
    assert source.token() == "t1"
    issuer.now += 14
    assert source.token() == "t1"
    issuer.now += 1
    assert source.token() == "t2"


def test_a_failed_refresh_is_raised_and_tried_again_by_the_next_call() -> None:
    issuer = Issuer()
    issuer.fail_next = 1
    source = TokenSource(CREDS, issuer.reply, issuer.clock())
    with pytest.raises(Unavailable):
        source.token()
    assert source.token() == "t2"


def test_threads_share_one_refresh() -> None:
    issuer = Issuer()
    gate = threading.Barrier(8)

    def slow(path: str, request: message.Message) -> Any:
        time.sleep(0.02)  # long enough for every thread to find the token missing
        return issuer.reply(path, request)

    source = TokenSource(CREDS, slow, issuer.clock())
    tokens: list[str] = []

    def call() -> None:
        gate.wait()
        tokens.append(source.token())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tokens == ["t1"] * 8 and len(issuer.requests) == 1


async def test_coroutines_share_one_refresh() -> None:
    issuer = Issuer()
    source = AsyncTokenSource(CREDS, issuer.areply, issuer.clock())
    tokens = await asyncio.gather(*(source.token() for _ in range(50)))
    assert set(tokens) == {"t1"} and len(issuer.requests) == 1
    issuer.now += 850
    tokens = await asyncio.gather(*(source.token() for _ in range(50)))
    assert set(tokens) == {"t2"} and len(issuer.requests) == 2


def test_a_rejected_token_is_replaced_once() -> None:
    issuer = Issuer()
    source = TokenSource(CREDS, issuer.reply, issuer.clock())
    assert source.token() == "t1"
    assert source.invalidate("t1")
    assert source.token() == "t2"
    # A stale rejection (of a token already replaced) does not discard the new one.
    assert source.invalidate("t1")
    assert source.token() == "t2"
    static = TokenSource(StaticToken("fixed"), issuer.reply, issuer.clock())
    assert static.token() == "fixed" and not static.invalidate("fixed")


def test_an_exchange_gets_the_actors_token_first() -> None:
    issuer = Issuer()
    creds = TokenExchange(subject_token="user-jwt", audience="memory-hub", actor=CREDS)
    source = TokenSource(creds, issuer.reply, issuer.clock())
    assert source.token() == "t2"
    (p1, _), (p2, exchange) = issuer.requests
    assert (p1, p2) == (ISSUE_TOKEN, EXCHANGE_TOKEN)
    assert isinstance(exchange, auth_pb2.ExchangeTokenRequest)
    assert exchange.subject_token == "user-jwt" and exchange.actor_token == "t1"
    assert exchange.audience == "memory-hub"


def test_secrets_stay_out_of_reprs() -> None:
    assert "secret" not in repr(CREDS)
    assert "user-jwt" not in repr(TokenExchange(subject_token="user-jwt"))
    with pytest.raises(ValueError):
        StaticToken(" ")
