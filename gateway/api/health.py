"""Readiness: the database answers SELECT 1 and the broker accepts a connection.

The broker check opens (and closes) one AMQP connection with a short
timeout. Each check is shared by the probes that come while it runs, and its
result reused for a second: a burst of probes costs the database one query
and the broker one connection a second, whatever their number.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg

from gateway import broker, logs, monitoring

log = logs.get("gateway.api.health")

TIMEOUT = 2.0
REUSE_SECONDS = 1.0


class _Reused:
    """`check()`'s result, run at most once per REUSE_SECONDS, concurrent callers sharing a run."""

    def __init__(self, check: Callable[[], Awaitable[bool]]):
        self._check = check
        self._at = float("-inf")
        self._ok = False
        self._running: asyncio.Future[bool] | None = None

    async def __call__(self) -> bool:
        if time.monotonic() - self._at < REUSE_SECONDS:
            return self._ok
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        running = self._running
        try:
            return await asyncio.shield(running)
        finally:
            if running.done() and self._running is running:
                self._running = None

    async def _run(self) -> bool:
        ok = await self._check()
        self._ok, self._at = ok, time.monotonic()
        return ok


class Readiness:
    def __init__(self, pool: asyncpg.Pool, amqp_url: str):
        self._amqp_url = amqp_url
        self._database = _Reused(lambda: monitoring.database_answers(pool, TIMEOUT))
        self._broker = _Reused(self._connect_broker)

    async def check(self) -> dict[str, str]:
        database, broker = await asyncio.gather(self._database(), self._broker())
        return {"database": "ok" if database else "failed", "broker": "ok" if broker else "failed"}

    async def _connect_broker(self) -> bool:
        try:
            connection = await asyncio.wait_for(broker.connect(self._amqp_url, timeout=TIMEOUT), TIMEOUT + 0.5)
            await connection.close()
            return True
        except Exception as exc:  # noqa: BLE001
            log.warning("readiness: broker failed", error=f"{type(exc).__name__}: {exc}")
            return False
