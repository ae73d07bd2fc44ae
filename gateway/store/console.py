"""The /ops console's pages: the overview, flagged payments, findings, search, a payment's timeline.

gateway/api/ops/ reads these for a person at the console (full scans are fine: a person
opens a page, no machine polls it), and records an operator's action in the payment's
history. Not scoped by merchant. SQL in gateway/sql/console.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load

_sql = load(SQL_DIR / "console.sql")


async def ops_payment_counts(db: Executor) -> list[asyncpg.Record]:
    """status, payments and flagged (attention_required) per payment status."""
    return await all_rows(_sql.ops_payment_counts, db)


async def ops_backlog(db: Executor) -> asyncpg.Record:
    """outbox_unsent, outbox_oldest_unsent_at, parked_operations, last_finding_at."""
    return await _sql.ops_backlog(db)


async def ops_flagged_payments(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    """Payments with attention_required, most recently changed first, with their pending operation."""
    return await all_rows(_sql.ops_flagged_payments, db, limit=limit)


async def ops_findings(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    """Reconciliation findings, newest first, with payment_status and attention_required."""
    return await all_rows(_sql.ops_findings, db, limit=limit)


async def ops_search_payments(db: Executor, *, term: str, limit: int) -> list[asyncpg.Record]:
    """Payments (any merchant) whose id, order id or customer id is `term`, newest first."""
    return await all_rows(_sql.ops_search_payments, db, term=term, limit=limit)


async def ops_timeline_operations(db: Executor, *, payment_id: str) -> list[asyncpg.Record]:
    return await all_rows(_sql.ops_timeline_operations, db, payment_id=payment_id)


async def ops_timeline_messages(db: Executor, *, needles: Sequence[str]) -> list[asyncpg.Record]:
    """Outbox rows whose body contains any of `needles` (a payment id, its operation ids), oldest first."""
    return await all_rows(_sql.ops_timeline_messages, db, needles=list(needles))


async def record_ops_action(db: Connection, *, operation_id: str, cause: str, at: datetime) -> None:
    """A history row for the operation's payment, in its current status, with `cause`."""
    await _sql.record_ops_action(db, operation_id=operation_id, cause=cause, at=at)
