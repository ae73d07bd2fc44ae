"""A TCP proxy on 127.0.0.1 standing for a server that dies or a connection that is cut.

    proxy = await TcpProxy(("127.0.0.1", 5672)).start()       # proxy.port forwards there
    await proxy.close()        # the "node" dies: no more accepts, every connection cut

    proxy = await TcpProxy(("127.0.0.1", 5432), cut_commit_every=5).start()

With `cut_commit_every=N`, every N-th COMMIT a client sends in PostgreSQL's simple query
protocol (asyncpg commits a transaction that way) loses its connection: alternately after
the server has answered (the commit happened, the client never hears of it) and before the
server sees it (it did not happen). Either way the client's outcome is unknown, as when a
database host dies mid-commit. Clients must connect with sslmode=disable for the proxy to
read their messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class _PgClientStream:
    """Reads the client's side of a PostgreSQL connection, message by message."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.started = False  # past the start-up message (typed messages from here)

    def commits_in(self, data: bytes) -> int:
        self.buffer += data
        commits = 0
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    return commits
                (length,) = struct.unpack("!I", self.buffer[:4])
                if len(self.buffer) < length:
                    return commits
                (code,) = struct.unpack("!I", self.buffer[4:8])
                self.started = code not in (_SSL_REQUEST, _GSSENC_REQUEST)
                del self.buffer[:length]
                continue
            if len(self.buffer) < 5:
                return commits
            kind = self.buffer[0:1]
            (length,) = struct.unpack("!I", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return commits
            body = bytes(self.buffer[5 : 1 + length])
            del self.buffer[: 1 + length]
            if kind == b"Q" and body.rstrip(b"\x00").strip().rstrip(b";").upper() == b"COMMIT":
                commits += 1


class TcpProxy:
    def __init__(self, target: tuple[str, int], *, cut_commit_every: int = 0):
        self.target = target
        self.cut_commit_every = cut_commit_every
        self.commits = 0
        self.cut_after = 0  # commits whose answer was dropped (done, the client unaware)
        self.cut_before = 0  # commits dropped before the server saw them (not done)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop accepting and cut every connection (as a host that died would)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}
        cut = asyncio.Event()  # set while an answer to a COMMIT must be dropped

        def abort() -> None:
            client_writer.transport.abort()
            server_writer.transport.abort()

        async def upstream() -> None:
            stream = _PgClientStream() if self.cut_commit_every else None
            while data := await client_reader.read(65536):
                if stream is not None and stream.commits_in(data):
                    self.commits += 1
                    if self.commits % self.cut_commit_every == 0:
                        if (self.cut_after + self.cut_before) % 2 == 0:
                            self.cut_after += 1
                            cut.set()  # the server commits; its answer never arrives
                        else:
                            self.cut_before += 1
                            abort()
                            return
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if cut.is_set():
                    abort()
                    return
                client_writer.write(data)
                await client_writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await task
            abort()
            self._writers -= {client_writer, server_writer}
