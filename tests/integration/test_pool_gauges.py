"""gateway.monitoring.pool_gauges on a real asyncpg pool: asyncpg has no public count of
acquire() calls waiting, so the gauge reads its internal queue; this holds it to that."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from gateway import db, monitoring


async def test_in_use_and_waiting_follow_the_pool(database_url):
    pool = await db.create_pool(database_url, min_size=2, max_size=2)
    registry = CollectorRegistry()
    monitoring.pool_gauges(registry, lambda: pool)

    def gauges() -> tuple[float | None, float | None]:
        return registry.get_sample_value("gateway_db_pool_in_use"), registry.get_sample_value("gateway_db_pool_waiting")

    try:
        assert gauges() == (0, 0)
        first, second = await pool.acquire(), await pool.acquire()
        assert gauges() == (2, 0)
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)
        assert gauges() == (2, 1)
        await pool.release(first)
        third = await asyncio.wait_for(waiter, 5)
        assert gauges() == (2, 0)
        await pool.release(second)
        await pool.release(third)
        assert gauges() == (0, 0)
    finally:
        await pool.close()
