"""Reconciliation: settled payments compared with the bank, safe repairs, findings and flags.

gateway/ops/reconcile.py runs a pass (gatewayctl reconcile, or the sweeper periodically
under try_lock_reconciliation: one pass at a time across workers); an operator's decision
locks its payment with reconcile_lock_payment, and an abandoned authorization is recorded as a
finding. SQL in gateway/sql/reconciliation.sql.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from gateway.messages import OutboxMessage
from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load
from gateway.store.outbox import event_columns

# A session advisory lock key of the gateway's own (see database.py for the other).
RECONCILIATION_LOCK = 0x7265636F6E63696C  # one reconciliation pass at a time across workers

_sql = load(SQL_DIR / "reconciliation.sql")


async def reconcile_candidates(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    return await all_rows(_sql.reconcile_candidates, db, limit=limit)


async def reconcile_lock_payment(db: Connection, *, payment_id: str) -> asyncpg.Record | None:
    """The payment locked, with history and `busy` (an operation is pending)."""
    return await _sql.reconcile_lock_payment(db, payment_id=payment_id)


async def reconcile_set_expiry(db: Connection, *, payment_id: str, expires_at: datetime, at: datetime) -> None:
    await _sql.reconcile_set_expiry(db, payment_id=payment_id, expires_at=expires_at, at=at)


async def flag_attention(db: Connection, *, payment_id: str, at: datetime, event: OutboxMessage) -> None:
    """Set attention_required and announce it, unless the payment is flagged already."""
    await _sql.flag_attention(db, payment_id=payment_id, at=at, **event_columns(event))


async def insert_finding(
    db: Connection, *, run_id: str, payment_id: str, kind: str, detail: dict, repaired: bool, found_at: datetime
) -> None:
    await _sql.insert_finding(
        db, run_id=run_id, payment_id=payment_id, kind=kind, detail=detail, repaired=repaired, found_at=found_at
    )


async def try_lock_reconciliation(db: Connection) -> bool:
    """Take the session lock of a reconciliation pass, unless another session holds it."""
    return await _sql.try_lock_reconciliation(db, lock=RECONCILIATION_LOCK)


async def unlock_reconciliation(db: Connection) -> None:
    await _sql.unlock_reconciliation(db, lock=RECONCILIATION_LOCK)
