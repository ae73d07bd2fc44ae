"""The receipt's history is built in SQL (payment_history_json in schema.sql, for every read of a
payment) and in Python (Payment.entering, for the replies, events and wake-ups written before
the row is read again). The receipt's shape has one definition, gateway.views.receipt: for the
same payment, the receipt of the row the store reads must be exactly the receipt of the Payment
the gateway built in Python.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway import store
from gateway.domain import Payment, Status
from gateway.views import receipt

pytestmark = pytest.mark.asyncio(loop_scope="session")

MERCHANT = "receipts"
START = datetime(2031, 2, 3, 4, 5, 6, 0, tzinfo=UTC)  # no microseconds: still six digits
# A status repeated (ops resolving a flag leaves a history row in the same status) is not a
# new status to FicMart: neither the SQL nor entering() shows it twice.
STEPS = [
    (Status.AUTHORIZED, timedelta(seconds=1, microseconds=999_999)),
    (Status.AUTHORIZED, timedelta(seconds=2)),
    (Status.CAPTURING, timedelta(minutes=3, microseconds=1)),
    (Status.CAPTURED, timedelta(days=40, microseconds=500_000)),
]


def _built_in_python() -> Payment:
    payment = Payment.pending(
        id=f"pay_{uuid.uuid4().hex}",
        order_id=f"ord_{uuid.uuid4().hex}",
        customer_id="cus_receipts",
        amount=1234,
        card_brand="mastercard",
        card_last4="4444",
        card_expiry_month=7,
        card_expiry_year=2033,
        at=START,
    )
    for status, after in STEPS:
        payment = payment.entering(status, START + after)
    return replace(
        payment,
        authorization_id=f"auth_{uuid.uuid4()}",
        authorization_expires_at=START + timedelta(days=7),
        capture_id=f"cap_{uuid.uuid4()}",
        last_error={"code": "bank_timeout", "message": "the bank did not answer in time", "retryable": True},
        attention_required=True,
    )


async def _write(pool, payment: Payment) -> None:
    """The payment's row and its history rows, every one the steps wrote (the repeat too); the
    times given in another zone than UTC, as a connection in any zone may write them."""
    elsewhere = timezone(timedelta(hours=5, minutes=30))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO payments (id, merchant, order_id, customer_id, amount, currency, status, card_brand,
                                     card_last4, card_expiry_month, card_expiry_year, authorization_id,
                                     authorization_expires_at, capture_id, void_id, refund_id, last_error,
                                     attention_required, created_at, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)""",
            payment.id,
            MERCHANT,
            payment.order_id,
            payment.customer_id,
            payment.amount,
            payment.currency,
            payment.status.value,
            payment.card_brand,
            payment.card_last4,
            payment.card_expiry_month,
            payment.card_expiry_year,
            payment.authorization_id,
            payment.authorization_expires_at,
            payment.capture_id,
            payment.void_id,
            payment.refund_id,
            payment.last_error,
            payment.attention_required,
            payment.created_at,
            payment.updated_at,
        )
        rows = [(Status.PENDING, START), *((status, START + after) for status, after in STEPS)]
        await conn.executemany(
            "INSERT INTO payment_history (payment_id, status, cause, at) VALUES ($1, $2, 'test', $3)",
            [(payment.id, status.value, at.astimezone(elsewhere)) for status, at in rows],
        )


async def test_the_receipt_read_from_sql_is_the_one_built_in_python(pool):
    payment = _built_in_python()
    await _write(pool, payment)
    row = await store.payment_by_id(pool, payment_id=payment.id, merchant=MERCHANT)
    expected = receipt(payment)
    assert row["history"] == expected["history"]  # as the SQL built it, before any parsing
    assert [h["status"] for h in row["history"]] == ["pending", "authorized", "capturing", "captured"]
    assert Payment.from_row(row) == payment
    assert receipt(Payment.from_row(row)) == expected
    assert receipt(Payment.from_row(await store.ops_payment(pool, payment_id=payment.id))) == expected
