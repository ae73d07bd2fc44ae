"""Periodic housekeeping inside gateway-worker.

(a) Stuck operations: pending, not parked, no live lease and idle for longer
    than SWEEPER_STUCK_AFTER_SECONDS plus the longest retry delay (so an
    operation resting in a retry queue is not counted) get a fresh command
    through the outbox. The bank key does not change, so if the old command
    turns up after all, the second one finds the operation finished.
(b) Lapsed holds: authorized payments whose authorization_expires_at has
    passed are expired by lapses.expire_hold(), which also starts the
    RELEASE (void) of the hold at the bank.

(c) Old cards: the vault keeps no card longer than ABANDON_AFTER_HOURS
    (lapses.purge_old_cards); an authorization still waiting for one is
    parked with last_error card_purged, for ops to abandon.
(d) Old idempotency keys: stored API responses older than
    IDEMPOTENCY_KEY_RETENTION_HOURS are deleted, IDEMPOTENCY_PRUNE_BATCH_SIZE
    rows per transaction, until a batch comes back short (at most
    PRUNE_BATCHES_PER_PASS per pass). The API only inserts keys, so a batch
    never holds up a request.

(d') Old events: the events feed's rows older than EVENT_RETENTION_DAYS, the same
    way, in batches of IDEMPOTENCY_PRUNE_BATCH_SIZE.

(e) Reconciliation, every RECONCILE_INTERVAL_SECONDS: receipts against the
    bank's books (gateway.ops.reconcile), repairing only what moves no money.
(f) Lapsed doubts: a payment flagged possible_duplicate_hold (an attempt's answer lost
    before the approval) whose own hold expired over BANK_CLOCK_MARGIN ago has its
    flag cleared with that reason: the second hold, placed earlier, lapsed too, so
    nothing is left for ops to void (decisions.close_lapsed_doubt re-checks under the
    payment's lock).

(g) The busy tables vacuumed and analyzed as autovacuum would, when the server runs without
    it (worker/upkeep.py), every UPKEEP_SECONDS beside the sweep.

Several workers may sweep at once: (a), (c) and (d) lock with SKIP LOCKED;
(a) bumps updated_at in the same transaction; (b) re-checks each payment under
its lock; (e) runs in one worker at a time, under a session advisory lock.
A payment that (b), (e) or (f) finds locked by another session past
DB_LOCK_TIMEOUT_SECONDS is left for the next pass; the others are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from gateway import db, logs, messages, process, store
from gateway.ops import decisions, reconcile
from gateway.ops.rules import DEFAULT_ABANDON_AFTER_HOURS
from gateway.payments import lapses
from gateway.timefmt import iso
from worker import upkeep
from worker.settings import (
    DEFAULT_EVENT_RETENTION_DAYS,
    DEFAULT_KEY_RETENTION_HOURS,
    DEFAULT_PRUNE_BATCH_SIZE,
    WorkerSettings,
)

log = logs.get("sweeper")

# Bounds one pass of (d): a backlog (a first start on a years-old table) is worked off over
# several passes rather than in one long burst.
PRUNE_BATCHES_PER_PASS = 100

# The hold's expiry is the bank's clock; ours may run behind it.
BANK_CLOCK_MARGIN = timedelta(hours=1)


@dataclass(frozen=True)
class Housekeeping:
    """How long the database keeps what it must not keep for ever."""

    card_max_age: timedelta = timedelta(hours=DEFAULT_ABANDON_AFTER_HOURS)
    key_retention: timedelta = timedelta(hours=DEFAULT_KEY_RETENTION_HOURS)
    prune_batch: int = DEFAULT_PRUNE_BATCH_SIZE
    event_retention: timedelta = timedelta(days=DEFAULT_EVENT_RETENTION_DAYS)

    @classmethod
    def of(cls, cfg: WorkerSettings) -> Housekeeping:
        """ABANDON_AFTER_HOURS, IDEMPOTENCY_KEY_RETENTION_HOURS, IDEMPOTENCY_PRUNE_BATCH_SIZE, EVENT_RETENTION_DAYS."""
        return cls(
            card_max_age=timedelta(hours=cfg.abandon_after_hours),
            key_retention=timedelta(hours=cfg.key_retention_hours),
            prune_batch=cfg.prune_batch,
            event_retention=timedelta(days=cfg.event_retention_days),
        )


@dataclass(frozen=True)
class Sweep:
    """What one pass did."""

    requeued: int = 0
    expired: int = 0
    cards_purged: int = 0
    keys_pruned: int = 0
    doubts_closed: int = 0
    events_pruned: int = 0


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
        try:
            expired = await lapses.expire_hold(pool, payment_id)
        except db.TIMED_OUT as exc:
            _held_elsewhere(payment_id, exc)
            continue
        if expired is not None:
            moved += 1
            log.info("hold expired", payment_id=payment_id)
    return moved


def _held_elsewhere(payment_id: str, exc: Exception) -> None:
    """One payment whose row another session holds past the lock timeout: the pass goes on with
    the others, and a later pass looks again."""
    log.warning("payment locked elsewhere; left for the next pass", payment_id=payment_id, error=type(exc).__name__)


async def close_lapsed_doubts(pool: asyncpg.Pool, limit: int) -> int:
    """Close every possible-second-hold flag whose hold has lapsed at the bank; returns how many."""
    closed = 0
    for row in await store.lapsed_doubts(pool, margin_seconds=BANK_CLOCK_MARGIN.total_seconds(), limit=limit):
        reason = (
            f"any second hold has lapsed at the bank: it was placed before {row['authorization_id']}, "
            f"whose hold expired at {iso(row['authorization_expires_at'])}"
        )
        try:
            await decisions.close_lapsed_doubt(pool, row["id"], reason=reason)
        except decisions.OpsRefused as exc:  # in flight or changed meanwhile: a later pass looks again
            log.info("possible second hold left flagged", payment_id=row["id"], why=str(exc))
            continue
        except db.TIMED_OUT as exc:
            _held_elsewhere(row["id"], exc)
            continue
        closed += 1
        log.warning("possible second hold closed: lapsed at the bank", payment_id=row["id"])
    return closed


async def purge_old_cards(pool: asyncpg.Pool, max_age: timedelta, limit: int) -> int:
    """Delete every card kept longer than `max_age`; returns how many."""
    purged = await lapses.purge_old_cards(pool, max_age, limit)
    for payment_id in purged:
        log.warning("card purged from the vault; its authorization is parked for ops", payment_id=payment_id)
    return len(purged)


async def _prune(prune: Callable[..., Awaitable[int]], pool: asyncpg.Pool, retention: timedelta, batch: int) -> int:
    """`prune` (a store statement) `batch` rows per transaction until a batch comes back short."""
    total = 0
    for _ in range(PRUNE_BATCHES_PER_PASS):
        deleted = await prune(pool, retention_seconds=retention.total_seconds(), limit=batch)
        total += deleted
        if deleted < batch:
            break
    return total


async def prune_idempotency_keys(pool: asyncpg.Pool, retention: timedelta, batch: int) -> int:
    """Delete stored API responses older than `retention`, `batch` rows per transaction; returns how many."""
    total = await _prune(store.prune_idempotency_keys, pool, retention, batch)
    if total:
        log.info("idempotency keys pruned", deleted=total, retention_hours=retention.total_seconds() / 3600)
    return total


async def prune_events(pool: asyncpg.Pool, retention: timedelta, batch: int) -> int:
    """Delete events older than `retention` from the events feed, `batch` rows per transaction."""
    total = await _prune(store.prune_events, pool, retention, batch)
    if total:
        log.info("events pruned", deleted=total, retention_days=retention.total_seconds() / 86400)
    return total


async def sweep_once(
    pool: asyncpg.Pool,
    idle_seconds: float,
    limit: int,
    housekeeping: Housekeeping = Housekeeping(),
    *,
    requeue: bool = True,
) -> Sweep:
    return Sweep(
        requeued=await requeue_stuck(pool, idle_seconds, limit) if requeue else 0,
        expired=await expire_lapsed_holds(pool, limit),
        cards_purged=await purge_old_cards(pool, housekeeping.card_max_age, limit),
        keys_pruned=await prune_idempotency_keys(pool, housekeeping.key_retention, housekeeping.prune_batch),
        doubts_closed=await close_lapsed_doubts(pool, limit),
        events_pruned=await prune_events(pool, housekeeping.event_retention, housekeeping.prune_batch),
    )


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
    housekeeping: Housekeeping = Housekeeping(),
    bank_unavailable: Callable[[], bool] = lambda: False,
) -> None:
    """Sweep every `interval` seconds (and reconcile every `reconcile_interval`) until `stop` is set.

    While `bank_unavailable()` (the worker's circuit breaker is open) operations wait for the
    bank on purpose, unleased and idle: they are not stuck, and are not re-enqueued.
    A failed pass is logged and tried again at the next tick.
    """
    loop = asyncio.get_running_loop()
    next_reconcile = loop.time() + reconcile_interval
    tables = asyncio.create_task(upkeep.run(pool, stop))
    while not stop.is_set():
        try:
            await sweep_once(pool, idle_seconds, limit, housekeeping, requeue=not bank_unavailable())
            if bank is not None and reconcile_interval > 0 and loop.time() >= next_reconcile:
                next_reconcile = loop.time() + reconcile_interval
                await reconcile_once(pool, bank, rate=reconcile_rate, limit=reconcile_limit)
        except Exception as exc:
            log.warning("sweep failed", error=type(exc).__name__, detail=str(exc)[:200])
        await process.wait(stop, interval)
    await tables
