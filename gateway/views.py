"""The read side: the receipt FicMart sees, built from a payments row and its history."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from gateway import store
from gateway.timefmt import iso


def payment_json(row: Mapping[str, Any] | asyncpg.Record) -> dict:
    """The payment (receipt) of docs/api.md. `row` is a payments row plus `history`."""
    return {
        "id": row["id"],
        "order_id": row["order_id"],
        "customer_id": row["customer_id"],
        "amount": row["amount"],
        "currency": row["currency"],
        "status": row["status"],
        "card": {
            "brand": row["card_brand"],
            "last4": row["card_last4"],
            "expiry_month": row["card_expiry_month"],
            "expiry_year": row["card_expiry_year"],
        },
        "bank": {
            "authorization_id": row["authorization_id"],
            "authorization_expires_at": iso(row["authorization_expires_at"]),
            "capture_id": row["capture_id"],
            "void_id": row["void_id"],
            "refund_id": row["refund_id"],
        },
        "last_error": row["last_error"],
        "attention_required": row["attention_required"],
        "history": list(row["history"]),
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


async def get_payment(db: store.Executor, merchant: str, payment_id: str) -> dict | None:
    row = await store.payment_by_id(db, payment_id=payment_id, merchant=merchant)
    return payment_json(row) if row else None


async def list_payments(
    pool: asyncpg.Pool,
    merchant: str,
    *,
    order_id: str | None = None,
    customer_id: str | None = None,
    limit: int = 10,
    starting_after: str | None = None,
) -> tuple[list[dict], bool] | None:
    """A page of payments, newest first, and whether more follow.

    Returns None when `starting_after` names no payment of this merchant.
    """
    after = None
    if starting_after:
        after = await store.payment_cursor(pool, payment_id=starting_after, merchant=merchant)
        if after is None:
            return None
    if order_id is not None:
        rows = await store.payments_by_order(pool, merchant=merchant, order_id=order_id, after=after, limit=limit + 1)
    elif customer_id is not None:
        rows = await store.payments_by_customer(
            pool, merchant=merchant, customer_id=customer_id, after=after, limit=limit + 1
        )
    else:
        raise ValueError("list_payments needs order_id or customer_id")
    return [payment_json(r) for r in rows[:limit]], len(rows) > limit
