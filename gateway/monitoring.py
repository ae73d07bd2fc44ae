"""What a process shows to Prometheus and to whoever asks whether it is up.

    endpoint = Endpoint(registry, readiness)     GET /metrics (Prometheus text), /healthz
    await endpoint.start(host, port)             (the event loop answers), /readyz (readiness()
    await endpoint.close()                       says every check passed: 200, else 503)
    pool_gauges(registry, lambda: pool)          a PostgreSQL pool's connections in use and
                                                 requests waiting for one
    task = refresh_every(5.0, refresh, "...")    refresh() again and again (gauges read from the
                                                 database or the broker), failures logged
    await database_and_broker(pool, connection)  the checks of worker's and relay's /readyz
    await database_answers(pool)                 the database one alone (the API's too)

gateway-worker and gateway-relay serve an Endpoint on WORKER_METRICS_PORT / RELAY_METRICS_PORT;
gateway-api serves the same three paths, with /ops, on its admin listener (gateway.api.admin).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from gateway import logs, store

log = logs.get("monitoring")

# check name -> passed; each check bounds its own time.
Readiness = Callable[[], Awaitable[dict[str, bool]]]


READY_TIMEOUT = 2.0  # /readyz's database check


async def database_answers(pool: asyncpg.Pool | None, timeout: float = READY_TIMEOUT) -> bool:
    """The database answers `SELECT 1` within `timeout`; a failure is logged."""
    if pool is None:
        return False
    try:
        return await asyncio.wait_for(store.ping(pool), timeout)
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready"
        log.warning("readiness: database failed", error=f"{type(exc).__name__}: {exc}")
        return False


async def database_and_broker(pool: asyncpg.Pool | None, connection: object | None) -> dict[str, bool]:
    """The database answers in time; the AMQP connection (aio-pika's) is up."""
    connected = getattr(connection, "connected", None)
    return {"database": await database_answers(pool), "broker": connected is not None and connected.is_set()}


class ListenError(OSError):
    """The endpoint's address cannot be bound (taken, or not an address of this host)."""


def add_host_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of /metrics, /healthz and /readyz (default 127.0.0.1; 0.0.0.0 in a container)",
    )


def _json(status: int, body: dict) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class Endpoint:
    """The monitoring HTTP server of a process without an API of its own."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness):
        self._registry = registry
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._app = app

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; ListenError when the address cannot be bound."""
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks = await self._readiness()
        ready = all(checks.values())
        return _json(
            200 if ready else 503,
            {
                "status": "ok" if ready else "unavailable",
                "checks": {k: "ok" if v else "failed" for k, v in checks.items()},
            },
        )


def pool_gauges(registry: CollectorRegistry, pool: Callable[[], asyncpg.Pool | None]) -> None:
    """gateway_db_pool_in_use and gateway_db_pool_waiting, read from the pool at each scrape."""

    def in_use() -> int:
        p = pool()
        return 0 if p is None else p.get_size() - p.get_idle_size()

    def waiting() -> int:
        # asyncpg has no public count of acquire() calls waiting: they wait on the pool's
        # internal asyncio queue of connection holders.
        queue = getattr(pool(), "_queue", None)
        return sum(1 for waiter in getattr(queue, "_getters", ()) if not waiter.done())

    Gauge(
        "gateway_db_pool_in_use", "PostgreSQL connections of this process's pool in use", registry=registry
    ).set_function(in_use)
    Gauge(
        "gateway_db_pool_waiting", "Requests of this process waiting for a PostgreSQL connection", registry=registry
    ).set_function(waiting)


def refresh_every(seconds: float, refresh: Callable[[], Awaitable[object]], what: str) -> asyncio.Task:
    """A task running refresh() now and every `seconds` until cancelled; a failure (the database
    or the broker away) leaves the gauges as they were and is retried next time."""

    async def loop() -> None:
        while True:
            try:
                await refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything: the next round tries again
                log.debug(f"{what} not refreshed", error=type(exc).__name__, detail=str(exc)[:200])
            await asyncio.sleep(seconds)

    return asyncio.create_task(loop())
