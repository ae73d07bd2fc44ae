"""The sweeper's housekeeping: stuck work sent again, lapsed holds and doubts, old cards and keys.

worker/sweeper.py finds what the pipeline left behind (pending operations nobody works on,
holds past their expiry, doubts whose hold has lapsed) and what must not be kept (sealed
cards past their age, stored idempotent responses past their retention); the payment
phases (gateway/payments) act on a lapsed hold (lock_payment) or an old card
(lock_old_cards, purge_card). SQL in gateway/sql/housekeeping.sql.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import asyncpg

from gateway.messages import OutboxMessage
from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load
from gateway.store.outbox import event_columns

_sql = load(SQL_DIR / "housekeeping.sql")


async def lock_stuck_operations(db: Connection, *, idle_seconds: float, limit: int) -> list[asyncpg.Record]:
    """id, kind and payment_id of pending operations nobody works on, locked (SKIP LOCKED)."""
    return await all_rows(_sql.lock_stuck_operations, db, idle_seconds=idle_seconds, limit=limit)


async def requeue_operations(db: Connection, *, commands: Mapping[str, OutboxMessage]) -> None:
    """A fresh command (operation id -> command) through the outbox for each still pending operation."""
    await _sql.requeue_operations(
        db,
        operation_ids=list(commands),
        exchanges=[c.exchange for c in commands.values()],
        routing_keys=[c.routing_key for c in commands.values()],
        message_ids=[c.message_id for c in commands.values()],
        bodies=[c.body for c in commands.values()],
        headers=[c.headers for c in commands.values()],
    )


async def lapsed_holds(db: Executor, *, limit: int) -> list[str]:
    """Ids of authorized payments whose hold has expired."""
    return [r["id"] for r in await all_rows(_sql.lapsed_holds, db, limit=limit)]


async def lock_payment(db: Connection, *, payment_id: str) -> asyncpg.Record | None:
    """A lapsed hold's payment with its history, locked."""
    return await _sql.lock_payment(db, payment_id=payment_id)


async def lapsed_doubts(db: Executor, *, margin_seconds: float, limit: int) -> list[asyncpg.Record]:
    """Payments flagged with a possible second hold whose own hold expired over `margin_seconds` ago:
    id, authorization_id, authorization_expires_at."""
    return await all_rows(_sql.lapsed_doubts, db, margin_seconds=margin_seconds, limit=limit)


async def lock_old_cards(db: Connection, *, max_age_seconds: float, limit: int) -> list[asyncpg.Record]:
    """Cards sealed longer ago than `max_age_seconds`: payment_id, the pending authorize's
    operation_id and parked (null when there is none), the payment row and history; locked."""
    return await all_rows(_sql.lock_old_cards, db, max_age_seconds=max_age_seconds, limit=limit)


async def purge_card(
    db: Connection,
    *,
    payment_id: str,
    operation_id: str | None,
    at: datetime,
    error: dict,
    event: OutboxMessage | None,
) -> None:
    """Delete the card; park its pending authorization (unless leased) with `error`, and the event."""
    await _sql.purge_card(
        db, payment_id=payment_id, operation_id=operation_id, at=at, error=error, **event_columns(event)
    )


async def prune_idempotency_keys(db: Executor, *, retention_seconds: float, limit: int) -> int:
    """Delete up to `limit` stored responses older than `retention_seconds`; returns how many."""
    status = await _sql.prune_idempotency_keys(db, retention_seconds=retention_seconds, limit=limit)
    return int(status.split()[-1])


# The tables whose rows the payment flow inserts, updates and deletes all day: the queue-like
# ones (outbox, operations, card_vault) bloat with dead rows, and all of them grow from empty.
BUSY_TABLES = (
    "payments",
    "payment_history",
    "operations",
    "outbox",
    "card_vault",
    "idempotency_keys",
    "events",
    "webhook_deliveries",
)


async def tables_due_upkeep(db: Executor) -> list[asyncpg.Record]:
    """table_name and vacuum (else analyze only) of the busy tables autovacuum would see to now,
    when it is off; none when it is on."""
    return await all_rows(_sql.tables_due_upkeep, db, tables=list(BUSY_TABLES))


async def vacuum_or_analyze(db: Executor, *, table: str, vacuum: bool) -> None:
    """VACUUM (ANALYZE) or ANALYZE one busy table; SKIP_LOCKED: a table another session is
    vacuuming is left to it. (Not a named statement: neither takes a table as a parameter,
    so the name is checked against BUSY_TABLES instead.)"""
    if table not in BUSY_TABLES:
        raise ValueError(f"not a table the gateway keeps up: {table!r}")
    await db.execute(f"{'VACUUM (ANALYZE, SKIP_LOCKED)' if vacuum else 'ANALYZE (SKIP_LOCKED)'} {table}")
