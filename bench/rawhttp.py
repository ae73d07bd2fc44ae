"""A lean HTTP/1.1 client for the overload scenario: a pool of keep-alive connections on
asyncio streams, one request at a time on each, nothing but what the scenario reads (status,
Retry-After, Location, a Content-Length body).

Why not aiohttp: at 3x the API's capacity the load generator shares the machine with what
it measures, and aiohttp's client spends about 0.3 ms of CPU per request, a third of this
machine at 2,000 requests/s; this spends a fraction of that, so more of the CPU goes to the
processes under test. It speaks only to our own API, which always answers with
Content-Length (aiohttp's web.Response).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class ProtocolError(OSError):
    """An answer this client does not read (no Content-Length, a broken status line)."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class Pool:
    def __init__(self, host: str, port: int, size: int, *, timeout: float = 30.0):
        self._host, self._port, self._timeout = host, port, timeout
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
        for _ in range(size):
            self._idle.put_nowait(None)  # a slot without a connection yet
        self._open: set[asyncio.StreamWriter] = set()

    async def connect(self) -> None:
        """Open every connection now, as a client in service has them open already: the
        scenario measures answers, not connection set-up at its start."""
        slots = [self._idle.get_nowait() for _ in range(self._idle.qsize())]
        try:
            for i, slot in enumerate(slots):
                slots[i] = await self._connected(slot)
        finally:
            for slot in slots:
                self._idle.put_nowait(slot)

    async def _connected(
        self, slot: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The slot's connection, opened if it has none yet."""
        if slot is None:
            slot = await asyncio.open_connection(self._host, self._port)
            self._open.add(slot[1])
        return slot

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        head = [f"POST {path} HTTP/1.1", f"Host: {self._host}:{self._port}", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        slot = await self._idle.get()
        try:
            slot = await self._connected(slot)
            async with asyncio.timeout(self._timeout):  # no task of its own, unlike wait_for
                answer = await self._exchange(*slot, request)
        except BaseException:
            if slot is not None:
                self._open.discard(slot[1])
                slot[1].close()
            self._idle.put_nowait(None)
            raise
        if answer.headers.get("connection", "").lower() == "close":
            self._open.discard(slot[1])
            slot[1].close()
            slot = None
        self._idle.put_nowait(slot)
        return answer

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Answer:
        writer.write(request)
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"unreadable status line {lines[0][:80]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise ProtocolError("an answer without Content-Length")
        body = await reader.readexactly(int(headers["content-length"]))
        return Answer(status, headers, body)

    async def close(self) -> None:
        for writer in self._open:
            writer.close()
        self._open.clear()
