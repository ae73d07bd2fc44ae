"""The HTTP server around the app: what aiohttp does before our middleware runs.

A request aiohttp cannot parse (a bad request line, a header past its size
limit) never reaches the middleware: aiohttp answers it itself, in plain
text that can echo part of the offending line (an Authorization header, so
an API key), and logs the parser's exception with the same text. Here such
a request gets the API's JSON error with an X-Request-Id, and the log line
names the error's type only.

Connections are bounded in time: one that has not sent a complete request
head within IDLE_SECONDS is closed (idle keep-alive and half-sent headers
alike); a stalled body is cut by the handlers (routes.BODY_READ_SECONDS).
A handler runs to its end when its client goes away, except a long poll
waiting for a wake-up: it is cancelled, so that it frees its place at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import http_exceptions, web, web_protocol
from aiohttp.web_request import BaseRequest

from gateway import logs, process
from gateway.api.errors import HTTP_CODES, error_response
from gateway.api.middleware import ENDS_WITH_CLIENT, new_request_id

log = logs.get("gateway.api")

IDLE_SECONDS = 15.0
SHUTDOWN_SECONDS = 10.0
# Connections the kernel holds for us before accept(): a burst beyond aiohttp's default of 128
# is refused at the TCP level (a connection error for the client, not a 503 it can act on).
# Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 2048


class _JsonErrorsHandler(web_protocol.RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, http_exceptions.LineTooLong) and status == 400:
            status = 431
        code, text = HTTP_CODES.get(status, ("internal_error", "the gateway failed to handle the request"))
        request_id = new_request_id()
        # exc's text quotes the request; its type is enough to tell what went wrong.
        log.warning("malformed request", status=status, error=type(exc).__name__, request_id=request_id)
        response = error_response(status, code, text, headers={"X-Request-Id": request_id})
        response.force_close()
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        # A long poll whose client went away frees its place now rather than at its timeout
        # (only a parked one: anything else runs to its end, as aiohttp does by default).
        request, task = self._current_request, self._task_handler
        super().connection_lost(exc)
        if request is not None and task is not None and request.get(ENDS_WITH_CLIENT):
            task.cancel()


class _JsonErrorsServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections answer malformed requests in the API's error format."""

    def __init__(self, app: web.Application, *, idle_seconds: float = IDLE_SECONDS) -> None:
        super().__init__(
            app,
            access_log=None,
            keepalive_timeout=idle_seconds,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_SECONDS,
        )

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application; the only thing we change is
        # which protocol class it makes per connection.
        server.__class__ = _JsonErrorsServer
        return server


@dataclass(frozen=True)
class Listener:
    """A second application on an address of its own (gateway.api.admin's)."""

    app: web.Application
    host: str
    port: int


class AdminListenError(OSError):
    """The admin listener's address cannot be bound."""


async def serve(
    app: web.Application,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    reuse_port: bool = False,
    admin: Listener | None = None,
) -> None:
    """Listen until `stop` is set, then finish in-flight requests (up to SHUTDOWN_SECONDS) and close.
    With `reuse_port`, other processes may listen on the same port (the kernel spreads connections).
    `admin` is served too, started after `app` (whose start-up opens what both use)."""
    runner = Runner(app)
    await runner.setup()
    admin_runner: Runner | None = None
    try:
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port or None).start()
        log.info("gateway-api listening", host=host, port=port)
        if admin is not None:
            admin_runner = Runner(admin.app)
            await admin_runner.setup()
            try:
                await web.TCPSite(admin_runner, admin.host, admin.port).start()
            except OSError as exc:
                raise AdminListenError(
                    f"cannot serve /metrics, /healthz, /readyz and /ops on {admin.host}:{admin.port} "
                    f"(API_ADMIN_PORT): {exc.strerror or exc}"
                ) from None
            log.info("gateway-api admin listening", host=admin.host, port=admin.port)
        process.started()
        await stop.wait()
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()
