"""The operator's side: operations and payments of any merchant, and the decisions ops records by hand.

gateway/ops/ (dead letters, replays) and the console read operations and payments with
their history here; an operator's settle, resolve, set-reference or abandon (gatewayctl,
the /ops console) is recorded with ops_lock_operation, ops_finish_operation and
ops_resolve_payment. Nothing here is scoped by merchant. SQL in gateway/sql/ops.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, NamedTuple

import asyncpg

from gateway.domain import Status
from gateway.messages import OutboxMessage
from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load
from gateway.store.outbox import event_columns

_sql = load(SQL_DIR / "ops.sql")


async def ops_operations(db: Executor, *, operation_ids: Sequence[str]) -> list[asyncpg.Record]:
    """The operations (with payment_status and merchant) of these ids; unknown ids are left out."""
    return await all_rows(_sql.ops_operations, db, operation_ids=list(operation_ids))


async def ops_parked_operations(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    """Parked operations, longest parked first, as ops_operations reads them."""
    return await all_rows(_sql.ops_parked_operations, db, limit=limit)


async def ops_operation(db: Executor, *, operation_id: str) -> asyncpg.Record | None:
    """Every column an operator may want about one operation."""
    return await _sql.ops_operation(db, operation_id=operation_id)


async def ops_payment_operations(db: Executor, *, payment_id: str) -> list[asyncpg.Record]:
    return await all_rows(_sql.ops_payment_operations, db, payment_id=payment_id)


async def ops_payment(db: Executor, *, payment_id: str) -> asyncpg.Record | None:
    """Any merchant's payment, with its history as the receipt shows it."""
    return await _sql.ops_payment(db, payment_id=payment_id)


async def ops_payment_history(db: Executor, *, payment_id: str) -> list[asyncpg.Record]:
    """status, cause and at of every history row, oldest first."""
    return await all_rows(_sql.ops_payment_history, db, payment_id=payment_id)


class BankReferences(NamedTuple):
    """Bank ids to record where the receipt has none (None: leave the column as it is)."""

    authorization_id: str | None = None
    capture_id: str | None = None
    void_id: str | None = None
    refund_id: str | None = None


async def ops_lock_operation(db: Connection, *, operation_id: str) -> asyncpg.Record | None:
    """The operation (operation_id, kind, operation_status, parked, bank_key, leased, parked_seconds)
    with its payment row and history, both locked; None when there is no such operation."""
    return await _sql.ops_lock_operation(db, operation_id=operation_id)


async def ops_finish_operation(
    db: Connection,
    *,
    operation_id: str,
    operation_status: Literal["succeeded", "failed"],
    at: datetime,
    error: dict | None,
    payment_status: Status,
    attention_required: bool,
    references: BankReferences,
    cause: str,
    event: OutboxMessage | None,
) -> bool:
    """Ops finishes a parked operation: payment, history row, card gone, event. False if it
    was no longer parked and pending."""
    finished = await _sql.ops_finish_operation(
        db,
        operation_id=operation_id,
        operation_status=operation_status,
        at=at,
        error=error,
        payment_status=payment_status.value,
        attention_required=attention_required,
        **references._asdict(),
        cause=cause,
        **event_columns(event),
    )
    return finished == 1


async def ops_resolve_payment(
    db: Connection, *, payment_id: str, at: datetime, references: BankReferences, clear_flag: bool, cause: str
) -> bool:
    """Fill missing references (and clear attention_required, with `clear_flag`), with a history
    row; False when an operation is in flight (or there is no such payment)."""
    status = await _sql.ops_resolve_payment(
        db, payment_id=payment_id, at=at, clear_flag=clear_flag, cause=cause, **references._asdict()
    )
    return status == "INSERT 0 1"
