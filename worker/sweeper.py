"""Periodic housekeeping inside gateway-worker.

(a) Stuck operations: pending, not parked, no live lease and idle for longer
    than SWEEPER_STUCK_AFTER_SECONDS plus the longest retry delay (so an
    operation resting in a retry queue is not counted) get a fresh command
    through the outbox. The bank key does not change, so if the old command
    turns up after all, the second one finds the operation finished.
(b) Lapsed holds: authorized payments whose authorization_expires_at has
    passed are expired by payments.expire_hold(), which also starts the
    RELEASE (void) of the hold at the bank.

(c) Reconciliation, every RECONCILE_INTERVAL_SECONDS: receipts against the
    bank's books (worker.reconcile), repairing only what moves no money.

Several workers may sweep at once: (a) locks with SKIP LOCKED and bumps
updated_at in the same transaction; (b) re-checks each payment under its lock;
(c) runs in one worker at a time, under a session advisory lock.
"""

from __future__ import annotations

import asyncio

import asyncpg

from gateway import logs, messages, payments, store
from worker import reconcile

log = logs.get("sweeper")


async def requeue_stuck(pool: asyncpg.Pool, idle_seconds: float, limit: int) -> int:
    """Re-enqueue a command for every stuck operation; returns how many."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await store.lock_stuck_operations(conn, idle_seconds=idle_seconds, limit=limit)
        if not rows:
            return 0
        await store.requeue_operations(conn, commands={r["id"]: messages.command(r["id"], r["kind"]) for r in rows})
    for r in rows:
        log.warning("re-enqueued stuck operation", operation_id=r["id"], payment_id=r["payment_id"], kind=r["kind"])
    return len(rows)


async def expire_lapsed_holds(pool: asyncpg.Pool, limit: int) -> int:
    """Expire every authorized payment whose hold has lapsed; returns how many moved."""
    moved = 0
    for payment_id in await store.lapsed_holds(pool, limit=limit):
        if await payments.expire_hold(pool, payment_id) is not None:
            moved += 1
            log.info("hold expired", payment_id=payment_id)
    return moved


async def sweep_once(pool: asyncpg.Pool, idle_seconds: float, limit: int) -> tuple[int, int]:
    return await requeue_stuck(pool, idle_seconds, limit), await expire_lapsed_holds(pool, limit)


async def reconcile_once(pool: asyncpg.Pool, bank, *, rate: float, limit: int) -> reconcile.Report | None:
    """A repairing reconciliation pass, unless another worker is running one (then None)."""
    async with pool.acquire() as conn:
        if not await store.try_lock_reconciliation(conn):
            return None
        try:
            report = await reconcile.run_reconciliation(pool, bank, rate_per_second=rate, limit=limit, repair=True)
        finally:
            await store.unlock_reconciliation(conn)
    log.info("reconciliation pass", run_id=report.run_id, checked=report.checked, findings=len(report.findings))
    return report


async def run(
    pool: asyncpg.Pool,
    stop: asyncio.Event,
    *,
    interval: float,
    idle_seconds: float,
    limit: int,
    bank=None,
    reconcile_interval: float = 0,
    reconcile_rate: float = 5,
    reconcile_limit: int = 500,
) -> None:
    """Sweep every `interval` seconds (and reconcile every `reconcile_interval`) until `stop` is set.

    A failed pass is logged and tried again at the next tick.
    """
    loop = asyncio.get_running_loop()
    next_reconcile = loop.time() + reconcile_interval
    while not stop.is_set():
        try:
            await sweep_once(pool, idle_seconds, limit)
            if bank is not None and reconcile_interval > 0 and loop.time() >= next_reconcile:
                next_reconcile = loop.time() + reconcile_interval
                await reconcile_once(pool, bank, rate=reconcile_rate, limit=reconcile_limit)
        except Exception as exc:
            log.warning("sweep failed", error=type(exc).__name__, detail=str(exc)[:200])
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
