"""What the console's pages show, read from PostgreSQL (through gateway/store/) and the desk.

Plain values for the templates; nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from gateway import domain, store
from gateway.api.ops import port
from gateway.domain import Payment
from gateway.messages import is_events_exchange
from gateway.timefmt import now
from gateway.views import receipt

LIST_LIMIT = 200  # rows on a listing page; the page says when there may be more
SEARCH_LIMIT = 50
# A worker rewrites its breaker row on every change and periodically: a row older than this
# belongs to a worker that is gone or stuck.
CIRCUIT_STALE_AFTER = timedelta(minutes=3)


@dataclass(frozen=True)
class Circuit:
    worker_id: str
    open: bool
    changed_at: datetime
    detail: str | None
    stale: bool


@dataclass(frozen=True)
class Overview:
    by_status: list[asyncpg.Record]  # status, payments, flagged
    payments: int
    flagged: int
    backlog: asyncpg.Record  # see store.ops_backlog
    circuits: list[Circuit]
    dead_letter_messages: int | None  # None: RabbitMQ could not be asked
    broker_problem: str | None


async def circuits(pool: asyncpg.Pool) -> list[Circuit]:
    stale_before = now() - CIRCUIT_STALE_AFTER
    return [
        Circuit(r["worker_id"], r["open"], r["changed_at"], r["detail"], r["changed_at"] < stale_before)
        for r in await store.circuit_states(pool)
    ]


async def overview(pool: asyncpg.Pool, desk: port.DeadLetterDesk) -> Overview:
    by_status = await store.ops_payment_counts(pool)
    backlog = await store.ops_backlog(pool)
    try:
        depth: int | None = await desk.depth()
        problem = None
    except port.BrokerUnavailable as exc:
        depth, problem = None, str(exc)
    return Overview(
        by_status=by_status,
        payments=sum(r["payments"] for r in by_status),
        flagged=sum(r["flagged"] for r in by_status),
        backlog=backlog,
        circuits=await circuits(pool),
        dead_letter_messages=depth,
        broker_problem=problem,
    )


async def flagged(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await store.ops_flagged_payments(pool, limit=LIST_LIMIT)


async def findings(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await store.ops_findings(pool, limit=LIST_LIMIT)


async def search(pool: asyncpg.Pool, term: str) -> list[asyncpg.Record]:
    return await store.ops_search_payments(pool, term=term, limit=SEARCH_LIMIT)


# ---- one payment's timeline ---------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """An outbox row about the payment, not yet published: an event it announces or a command for
    one of its operations."""

    id: int
    exchange: str
    routing_key: str
    message_id: str
    created_at: datetime
    is_event: bool
    summary: str  # the event's payment status, or the command's operation
    body: bytes


@dataclass(frozen=True)
class Timeline:
    payment: dict[str, Any]  # the receipt, with `merchant`
    history: list[asyncpg.Record]  # status, cause, at
    operations: list[asyncpg.Record]
    messages: list[Message]
    # Bank references an operator may record now (payments.set_reference): those the status
    # implies and the receipt lacks, while no operation is in flight.
    recordable: list[str]


def _message(row: asyncpg.Record) -> Message:
    try:
        body = orjson.loads(row["body"])
    except orjson.JSONDecodeError:
        body = None
    is_event = is_events_exchange(row["exchange"])
    summary = ""
    if isinstance(body, dict):
        if is_event and isinstance(body.get("payment"), dict):
            summary = f"payment {body['payment'].get('status')}"
        elif not is_event:
            summary = f"operation {body.get('operation_id')}"
    return Message(
        id=row["id"],
        exchange=row["exchange"],
        routing_key=row["routing_key"],
        message_id=row["message_id"],
        created_at=row["created_at"],
        is_event=is_event,
        summary=summary,
        body=row["body"],
    )


async def timeline(pool: asyncpg.Pool, payment_id: str) -> Timeline | None:
    row = await store.ops_payment(pool, payment_id=payment_id)
    if row is None:
        return None
    payment = Payment.from_row(row)
    operations = await store.ops_timeline_operations(pool, payment_id=payment_id)
    needles = [payment_id, *(op["id"] for op in operations)]
    busy = any(op["status"] == "pending" for op in operations)
    return Timeline(
        payment={**receipt(payment), "merchant": row["merchant"]},
        history=await store.ops_payment_history(pool, payment_id=payment_id),
        operations=operations,
        messages=[_message(m) for m in await store.ops_timeline_messages(pool, needles=needles)],
        recordable=[] if busy else domain.missing_references(payment.status, payment.references),
    )
