"""Readiness: the database answers SELECT 1 and the broker accepts a connection.

The broker check opens (and closes) one AMQP connection with a short
timeout. Concurrent probes share one check, and a result is reused for a
second, so a burst of probes costs the broker one connection.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from gateway import broker, logs, monitoring

log = logs.get("gateway.api.health")

TIMEOUT = 2.0
_REUSE = 1.0


class Readiness:
    def __init__(self, pool: asyncpg.Pool, amqp_url: str):
        self._pool = pool
        self._amqp_url = amqp_url
        self._broker_at = float("-inf")
        self._broker_ok = False
        self._broker_check: asyncio.Future | None = None

    async def check(self) -> dict[str, str]:
        database, broker = await asyncio.gather(monitoring.database_answers(self._pool, TIMEOUT), self._broker())
        return {"database": "ok" if database else "failed", "broker": "ok" if broker else "failed"}

    async def _broker(self) -> bool:
        if time.monotonic() - self._broker_at < _REUSE:
            return self._broker_ok
        if self._broker_check is None:
            self._broker_check = asyncio.ensure_future(self._connect_broker())
        check = self._broker_check
        try:
            return await asyncio.shield(check)
        finally:
            if check.done() and self._broker_check is check:
                self._broker_check = None

    async def _connect_broker(self) -> bool:
        try:
            connection = await asyncio.wait_for(broker.connect(self._amqp_url, timeout=TIMEOUT), TIMEOUT + 0.5)
            await connection.close()
            ok = True
        except Exception as exc:  # noqa: BLE001
            log.warning("readiness: broker failed", error=f"{type(exc).__name__}: {exc}")
            ok = False
        self._broker_ok, self._broker_at = ok, time.monotonic()
        return ok
