"""A payment's next operation, as every phase that starts one makes it: a new operation id, the
bank idempotency key derived from it, and its command for the outbox. Intake starts the one a
request asks for, settlement the follow-up a bank outcome calls for, the sweeper the release of
a lapsed hold, and ops the void after an abandoned capture."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from gateway import messages, store
from gateway.domain import OperationKind, Payment, Status
from gateway.views import receipt


def bank_key(operation_id: str) -> str:
    """The bank idempotency key: derived from our own operation id, stable across every retry."""
    return f"gw-{operation_id}"


def begin(row: asyncpg.Record, status: Status, kind: OperationKind, at: datetime):
    """The payment as it will read once `status` is entered, a new operation id and its command."""
    payment = receipt(Payment.from_row(row).entering(status, at, last_error=None))
    op_id = messages.new_id("op")
    return payment, op_id, messages.command(op_id, kind.value)


async def enqueue(conn: store.Connection, payment_id: str, kind: OperationKind, at: datetime) -> str:
    """Insert a follow-up operation of the payment, with its command, in the caller's transaction;
    returns its id."""
    op_id = messages.new_id("op")
    await store.insert_operation(
        conn,
        operation_id=op_id,
        payment_id=payment_id,
        kind=kind,
        bank_key=bank_key(op_id),
        at=at,
        command=messages.command(op_id, kind.value),
    )
    return op_id
