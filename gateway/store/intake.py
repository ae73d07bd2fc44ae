"""The API's phases: a request recorded in one transaction under its idempotency key.

Authorize (submit_authorizations) and capture, void and refund requests
(lock_keys_and_payments, then start_operations) each write the payment's change, its
history, the operation, the command for a worker and the 202 they are answered with
(`StoredReply`) together; the payment phases (gateway/payments) call them. SQL in
gateway/sql/intake.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import asyncpg

from gateway.cards import SealedCard
from gateway.domain import OperationKind, Status
from gateway.messages import OutboxMessage
from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load
from gateway.store.outbox import command_arrays, event_arrays

_sql = load(SQL_DIR / "intake.sql")


class KeyedRequest(Protocol):
    """A request under an idempotency key (payments.IdempotentRequest)."""

    @property
    def merchant(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...


class StoredReply(NamedTuple):  # a NamedTuple: built on every authorize, ~8x cheaper than a frozen dataclass
    """The 202 a request is answered with, kept under its idempotency key."""

    request: KeyedRequest
    body: bytes
    location: str | None = None


def _replies(replies: Sequence[StoredReply | None]) -> dict[str, list[Any]]:
    """The stored replies' columns as arrays (the request's merchant, key, method, path and
    fingerprint, and the body), null where a row has none."""
    requests = [r.request if r else None for r in replies]
    return {
        "merchants": [q.merchant if q else None for q in requests],
        "keys": [q.key if q else None for q in requests],
        "methods": [q.method if q else None for q in requests],
        "paths": [q.path if q else None for q in requests],
        "fingerprints": [q.fingerprint if q else None for q in requests],
        "response_bodies": [r.body if r else None for r in replies],
    }


async def lock_idempotency_key(db: Connection, *, merchant: str, key: str) -> asyncpg.Record:
    """`locked` (false: another request with this key is running) and the stored reply's columns."""
    return await _sql.lock_idempotency_key(db, merchant=merchant, key=key)


class Submission(NamedTuple):
    """One authorize request for submit_authorizations: the payment and all that goes with it."""

    payment_id: str
    order_id: str
    customer_id: str
    amount: int
    card_brand: str
    card_last4: str
    card_expiry_month: int
    card_expiry_year: int
    at: datetime
    operation_id: str
    bank_key: str
    sealed_card: SealedCard
    command: OutboxMessage
    reply: StoredReply


async def submit_authorizations(db: Executor, *, submissions: Sequence[Submission]) -> list[asyncpg.Record]:
    """`locked` and `inserted` of each submission (of its request's merchant), in order."""
    return await all_rows(
        _sql.submit_authorizations,
        db,
        payment_ids=[s.payment_id for s in submissions],
        order_ids=[s.order_id for s in submissions],
        customer_ids=[s.customer_id for s in submissions],
        amounts=[s.amount for s in submissions],
        card_brands=[s.card_brand for s in submissions],
        card_last4s=[s.card_last4 for s in submissions],
        card_expiry_months=[s.card_expiry_month for s in submissions],
        card_expiry_years=[s.card_expiry_year for s in submissions],
        ats=[s.at for s in submissions],
        operation_ids=[s.operation_id for s in submissions],
        bank_keys=[s.bank_key for s in submissions],
        sealed_cards=[s.sealed_card.blob for s in submissions],
        card_key_ids=[s.sealed_card.key_id for s in submissions],
        **command_arrays([s.command for s in submissions]),
        **_replies([s.reply for s in submissions]),
        locations=[s.reply.location for s in submissions],
    )


async def live_payment_for_order(db: Executor, *, merchant: str, order_id: str) -> str | None:
    return await _sql.live_payment_for_order(db, merchant=merchant, order_id=order_id)


class KeyAndPayment(NamedTuple):
    """One capture, void or refund request for lock_keys_and_payments."""

    merchant: str
    key: str
    payment_id: str


async def lock_keys_and_payments(db: Connection, *, requests: Sequence[KeyAndPayment]) -> list[asyncpg.Record]:
    """For each request, in order: lock_idempotency_key's columns and the merchant's payment
    locked, with its history (the payment's columns all null when there is none)."""
    return await all_rows(
        _sql.lock_keys_and_payments,
        db,
        merchants=[r.merchant for r in requests],
        keys=[r.key for r in requests],
        payment_ids=[r.payment_id for r in requests],
    )


class OperationStart(NamedTuple):
    """A payment entering an in-progress status for start_operations; the event when the gateway
    moved it by itself, the reply when an API request did."""

    payment_id: str
    status: Status
    at: datetime
    cause: str
    operation_id: str
    kind: OperationKind
    bank_key: str
    command: OutboxMessage
    event: OutboxMessage | None = None
    reply: StoredReply | None = None


async def start_operations(db: Connection, *, starts: Sequence[OperationStart]) -> list[str]:
    """Each payment enters its status and its operation starts; the ids of the payments moved."""
    rows = await all_rows(
        _sql.start_operations,
        db,
        payment_ids=[s.payment_id for s in starts],
        statuses=[s.status.value for s in starts],
        ats=[s.at for s in starts],
        causes=[s.cause for s in starts],
        operation_ids=[s.operation_id for s in starts],
        kinds=[s.kind.value for s in starts],
        bank_keys=[s.bank_key for s in starts],
        **command_arrays([s.command for s in starts]),
        **event_arrays([s.event for s in starts]),
        **_replies([s.reply for s in starts]),
    )
    return [row["id"] for row in rows]
