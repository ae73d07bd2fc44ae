"""bench/rawhttp.py, the overload scenario's client, against an aiohttp server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import rawhttp


@pytest.fixture
async def server():
    seen: list[tuple[str, str, bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.path, request.headers.get("Idempotency-Key", ""), body))
        if request.path == "/full":
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "1"})
        if request.path == "/close":
            return web.Response(status=202, body=b"bye", headers={"Connection": "close"})
        return web.Response(status=202, body=body[::-1], headers={"Location": "/v1/payments/pay_1"})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    async with TestServer(app) as srv:
        srv.seen = seen
        yield srv


async def test_answers_are_read_whole_over_kept_connections(server):
    pool = rawhttp.Pool(server.host, server.port, 2)
    try:
        answers = await asyncio.gather(
            *(pool.post("/ok", f"body-{i}".encode(), {"Idempotency-Key": str(i)}) for i in range(6))
        )
        assert [a.status for a in answers] == [202] * 6
        assert [a.body for a in answers] == [f"body-{i}".encode()[::-1] for i in range(6)]
        assert answers[0].headers["location"] == "/v1/payments/pay_1"
        assert sorted(key for _, key, _ in server.seen) == [str(i) for i in range(6)]
        assert len(pool._open) <= 2  # the pool's bound
        refused = await pool.post("/full", b"{}", {})
        assert (refused.status, refused.headers["retry-after"], refused.body) == (503, "1", b'{"error": "busy"}')
    finally:
        await pool.close()


async def test_a_connection_the_server_closes_is_opened_again(server):
    pool = rawhttp.Pool(server.host, server.port, 1)
    try:
        assert (await pool.post("/close", b"", {})).body == b"bye"
        assert not pool._open
        assert (await pool.post("/ok", b"ab", {})).body == b"ba"
    finally:
        await pool.close()


async def test_connect_opens_every_connection_before_the_first_request(server):
    pool = rawhttp.Pool(server.host, server.port, 3)
    try:
        await pool.connect()
        assert len(pool._open) == 3 and not server.seen
        answers = await asyncio.gather(*(pool.post("/ok", b"xy", {}) for _ in range(5)))
        assert [a.body for a in answers] == [b"yx"] * 5 and len(pool._open) == 3
    finally:
        await pool.close()


async def test_nothing_listening_is_an_oserror_and_frees_the_slot():
    pool = rawhttp.Pool("127.0.0.1", 1, 1)
    for _ in range(2):  # the slot came back after the first failure
        with pytest.raises(OSError):
            await pool.post("/", b"", {})
