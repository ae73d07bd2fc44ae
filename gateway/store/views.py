"""The read side: payments as FicMart sees them, one by id or a page by order or customer.

Every statement is scoped by merchant; gateway/views.py turns the rows into receipts. SQL
in gateway/sql/views.sql.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from gateway.store.loader import SQL_DIR, Executor, all_rows, load

_sql = load(SQL_DIR / "views.sql")


class PageCursor(NamedTuple):
    """Where a page of payments starts: after this (created_at, id), newest first."""

    created_at: datetime
    id: str


async def payment_by_id(db: Executor, *, payment_id: str, merchant: str) -> asyncpg.Record | None:
    return await _sql.payment_by_id(db, payment_id=payment_id, merchant=merchant)


async def payment_cursor(db: Executor, *, payment_id: str, merchant: str) -> PageCursor | None:
    row = await _sql.payment_cursor(db, payment_id=payment_id, merchant=merchant)
    return PageCursor(row["created_at"], row["id"]) if row else None


async def payments_by_order(
    db: Executor, *, merchant: str, order_id: str, after: PageCursor | None, limit: int
) -> list[asyncpg.Record]:
    return await all_rows(
        _sql.payments_by_order,
        db,
        merchant=merchant,
        order_id=order_id,
        cursor_at=after.created_at if after else None,
        cursor_id=after.id if after else None,
        limit=limit,
    )


async def payments_by_customer(
    db: Executor, *, merchant: str, customer_id: str, after: PageCursor | None, limit: int
) -> list[asyncpg.Record]:
    return await all_rows(
        _sql.payments_by_customer,
        db,
        merchant=merchant,
        customer_id=customer_id,
        cursor_at=after.created_at if after else None,
        cursor_id=after.id if after else None,
        limit=limit,
    )
