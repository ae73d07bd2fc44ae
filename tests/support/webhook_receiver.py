"""A shop's webhook receiver for tests: records every POST, answers as the test says, and
checks signatures the way docs/webhooks.md tells a shop to (its own code, not the gateway's).

    receiver = Receiver(answer=lambda n, request: 503 if n < 3 else 200)
    await receiver.start()             # receiver.url: http://127.0.0.1:<port>/hooks
    ...
    await receiver.stop()              # down: connections refused; start() again on the same port
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from harness.procs import free_port


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered


def verify(header: str, secret: str, body: bytes) -> int:
    """The timestamp of a `Gateway-Signature` with a v1 made with `secret`; AssertionError if none."""
    fields = [part.split("=", 1) for part in header.split(",")]
    timestamps = [v for k, v in fields if k == "t"]
    assert len(timestamps) == 1, header
    expected = hmac.new(secret.encode(), f"{timestamps[0]}.".encode() + body, hashlib.sha256).hexdigest()
    assert any(k == "v1" and hmac.compare_digest(v, expected) for k, v in fields), header
    return int(timestamps[0])


class Receiver:
    def __init__(self, answer: Callable[[int, web.Request], int] = lambda n, request: 200, *, delay: float = 0.0):
        self.answer = answer
        self.delay = delay  # seconds before each answer: a slow shop
        self.port = free_port()
        self.received: list[Received] = []
        self.other_paths: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(self.delay)
        status = self.answer(len(self.received), request)
        self.received.append(Received(dict(request.headers), body, status))
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": f"http://127.0.0.1:{self.port}/elsewhere"})
        return web.Response(status=status, text="ok" if status < 300 else "no")

    async def _other(self, request: web.Request) -> web.Response:
        self.other_paths.append(request.path)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    def accepted(self) -> list[Received]:
        """The POSTs it answered with a 2xx."""
        return [r for r in self.received if 200 <= r.status < 300]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
