"""The read side: the receipt FicMart sees, built from a payments row and its history."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from gateway.db import Q
from gateway.timefmt import iso


def payment_json(row: Mapping[str, Any]) -> dict:
    """The payment (receipt) of gateway-api.md. `row` is a payments row plus `history`."""
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


async def get_payment(conn: asyncpg.Connection | asyncpg.Pool, merchant: str, payment_id: str) -> dict | None:
    row = await conn.fetchrow(Q["payment_by_id"], payment_id, merchant)
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
    cursor_at = cursor_id = None
    if starting_after:
        cursor = await pool.fetchrow(Q["payment_cursor"], starting_after, merchant)
        if cursor is None:
            return None
        cursor_at, cursor_id = cursor["created_at"], cursor["id"]
    query, value = ("payments_by_order", order_id) if order_id is not None else ("payments_by_customer", customer_id)
    rows = await pool.fetch(Q[query], merchant, value, cursor_at, cursor_id, limit + 1)
    return [payment_json(r) for r in rows[:limit]], len(rows) > limit
