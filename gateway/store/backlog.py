"""How much work waits: the gauges of gateway-relay and gateway-worker, and the API's admission count.

gateway-relay (outbox_backlog) and gateway-worker (pipeline_backlog) refresh their gauges
(worker/metrics.py) with these every few seconds; the API's load shedding asks work_waiting
whether the backlog passed its bound. SQL in gateway/sql/backlog.sql.
"""

from __future__ import annotations

import asyncpg

from gateway.store.loader import SQL_DIR, Executor, load

_sql = load(SQL_DIR / "backlog.sql")


async def outbox_backlog(db: Executor) -> asyncpg.Record:
    """unsent (rows not yet published) and oldest_seconds (the oldest one's age, None if none)."""
    return await _sql.outbox_backlog(db)


async def pipeline_backlog(db: Executor) -> asyncpg.Record:
    """parked (operations waiting for ops) and flagged (payments with attention_required)."""
    return await _sql.pipeline_backlog(db)


async def work_waiting(db: Executor, *, most: int) -> int:
    """Operations waiting for a worker (pending, not parked), counted up to `most`; 0 while a
    worker reports the bank's circuit open."""
    return await _sql.work_waiting(db, most=most)
