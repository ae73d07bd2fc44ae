"""Lapses: what the sweeper does to a payment whose time ran out. An authorization hold past its
expiry is marked expired and released at the bank (a void); a card kept in the vault past its
limit is deleted, and an authorization still waiting for it is parked for ops."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import asyncpg

from gateway import domain, messages, store
from gateway.domain import Payment, Status
from gateway.payments import operations
from gateway.timefmt import now
from gateway.views import receipt


async def expire_hold(pool: asyncpg.Pool, payment_id: str) -> dict | None:
    """An authorized payment whose hold lapsed: mark it expired and release the hold at the bank.

    Returns the payment, or None when it is no longer authorized (captured or
    voided meanwhile): the caller only acts on what is still true under the lock.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_payment(conn, payment_id=payment_id)
        if row is None or row["status"] != Status.AUTHORIZED.value:
            return None
        status, kind = domain.expire(Status(row["status"]))
        payment, op_id, cmd = operations.begin(row, status, kind, at := now())
        event = messages.event(domain.event_type(status), payment, at, merchant=row["merchant"])
        start = store.OperationStart(
            payment_id=payment_id,
            status=status,
            at=at,
            cause="sweeper:hold_expired",
            operation_id=op_id,
            kind=kind,
            bank_key=operations.bank_key(op_id),
            command=cmd,
            event=event,
        )
        await store.start_operations(conn, starts=[start])
    return payment


async def purge_old_cards(pool: asyncpg.Pool, max_age: timedelta, limit: int) -> list[str]:
    """Delete cards sealed longer than `max_age` ago; returns their payments' ids.

    An authorization still pending for such a card can never be sent: it is
    parked (attention_required, with the event unless the payment is flagged
    already) with last_error card_purged, and ops abandon it. Cards whose
    operation is leased (a bank call may be running) wait for a later pass.
    """
    hours = f"{max_age.total_seconds() / 3600:g}"
    error = {
        "code": domain.CARD_PURGED,
        "message": f"card purged: the vault keeps a card at most {hours} h, so this authorization can no "
        "longer be sent to the bank; ops abandon it (gatewayctl abandon)",
        "retryable": False,
    }
    async with pool.acquire() as conn, conn.transaction():
        rows = await store.lock_old_cards(conn, max_age_seconds=max_age.total_seconds(), limit=limit)
        at = now()
        for row in rows:
            event = None
            if row["operation_id"] is not None and not row["attention_required"]:
                payment = receipt(
                    replace(Payment.from_row(row), attention_required=True, last_error=error, updated_at=at)
                )
                event = messages.event(domain.ATTENTION_EVENT, payment, at, merchant=row["merchant"])
            await store.purge_card(
                conn, payment_id=row["payment_id"], operation_id=row["operation_id"], at=at, error=error, event=event
            )
    return [r["payment_id"] for r in rows]
