"""The read side: the receipt FicMart sees (docs/api.md), and the payments the API reads.

receipt() is the receipt's one serializer: the API's replies, the `payment` of every event,
the long polls' wake-ups and the /ops console all show what it makes of a Payment.
gateway.api.schemas.Payment describes the same shape for /openapi.json.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from gateway import store
from gateway.domain import Payment
from gateway.timefmt import iso


def receipt(payment: Payment) -> dict[str, Any]:
    """The payment as FicMart reads it: the card's public details and the bank's references
    grouped, timestamps in the API's format."""
    return {
        "id": payment.id,
        "order_id": payment.order_id,
        "customer_id": payment.customer_id,
        "amount": payment.amount,
        "currency": payment.currency,
        "status": payment.status.value,
        "card": {
            "brand": payment.card_brand,
            "last4": payment.card_last4,
            "expiry_month": payment.card_expiry_month,
            "expiry_year": payment.card_expiry_year,
        },
        "bank": {
            "authorization_id": payment.authorization_id,
            "authorization_expires_at": iso(payment.authorization_expires_at),
            "capture_id": payment.capture_id,
            "void_id": payment.void_id,
            "refund_id": payment.refund_id,
        },
        "last_error": payment.last_error,
        "attention_required": payment.attention_required,
        "history": [{"status": entry.status.value, "at": iso(entry.at)} for entry in payment.history],
        "created_at": iso(payment.created_at),
        "updated_at": iso(payment.updated_at),
    }


async def get_payment(db: store.Executor, merchant: str, payment_id: str) -> dict | None:
    row = await store.payment_by_id(db, payment_id=payment_id, merchant=merchant)
    return receipt(Payment.from_row(row)) if row else None


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
    return [receipt(Payment.from_row(r)) for r in rows[:limit]], len(rows) > limit
