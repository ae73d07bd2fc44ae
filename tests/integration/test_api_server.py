"""gateway.api.server: malformed requests get the JSON error format, slow clients are cut off."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from gateway.api.app import create_app
from gateway.api.server import Runner
from tests.integration.conftest import API_KEY


@pytest.fixture
async def server(api_settings, pool):
    runner = Runner(create_app(api_settings, pool), idle_seconds=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][:2]
    await runner.cleanup()


async def _exchange(address, raw: bytes, timeout: float = 5.0) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def test_an_oversized_authorization_header_gets_json_without_the_key(server, api_logs):
    secret = API_KEY + "X" * 20_000
    head, body = await _exchange(
        server, f"GET /v1/payments HTTP/1.1\r\nAuthorization: Bearer {secret}\r\n\r\n".encode()
    )
    assert head.split(b" ")[1] == b"431" and b"X-Request-Id: req_" in head
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert API_KEY.encode() not in head + body and b"XXXX" not in body
    assert API_KEY not in api_logs.getvalue()


@pytest.mark.parametrize(
    "raw", [b"GARBAGE\r\n\r\n", b"GET /v1/payments HTTP/9.9\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"]
)
async def test_unparseable_requests_get_the_json_error_format(server, raw):
    head, body = await _exchange(server, raw)
    assert head.split(b" ")[1] == b"400" and b"X-Request-Id: req_" in head, head
    assert b"application/json" in head and json.loads(body)["error"]["code"] == "bad_request"


@pytest.mark.parametrize("raw", [b"", b"POST /v1/payments HTTP/1.1\r\nHost: x\r\nContent-Type: applic"])
async def test_idle_and_half_sent_connections_are_closed(server, raw):
    reader, writer = await asyncio.open_connection(*server)
    writer.write(raw)
    await writer.drain()
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, nothing said
    assert asyncio.get_running_loop().time() - started < 3
    writer.close()
