"""Intake: what the API records when FicMart asks for something. An authorization (a new payment
and its authorize operation) or a capture, void or refund (the payment moved to its in-progress
status and the operation started), each with its outbox command and the 202 kept under the
request's idempotency key, in the transaction that decides it. The bank is called later, by a
worker (gateway.payments.settlement records what it answers).

A replayed key gets its stored response; a busy key, a reused one and a request the payment's
status refuses are the errors below, which the API turns into responses. Nothing is recorded
for a refusal, the key included.

Requests are recorded in batches: the API's batchers (gateway/api/routes.py) send the
authorizations that came meanwhile through submit_many, captures, voids and refunds through
request_actions; answer_authorization and answer_action read one request's answer from its
result.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import asyncpg
import orjson

from gateway import domain, fingerprints, messages, store
from gateway.cards import CardVault, brand
from gateway.crashpoints import crash_point
from gateway.domain import Action, InvalidTransition, OperationKind, Payment, ReferenceUnknown, Status
from gateway.payments import operations
from gateway.timefmt import now
from gateway.views import receipt


class RequestInProgress(Exception):
    """Another request with the same idempotency key is being handled right now."""


class IdempotencyKeyReused(Exception):
    """The key was used before for a different request."""


class PaymentNotFound(Exception):
    pass


class OrderAlreadyPaid(Exception):
    def __init__(self, payment_id: str):
        super().__init__(f"order already has a live payment {payment_id}")
        self.payment_id = payment_id


class AmountMismatch(Exception):
    def __init__(self, expected: int, got: int):
        super().__init__(f"amount must equal the payment's full amount {expected}, got {got}")
        self.expected = expected
        self.got = got


@dataclass(frozen=True)
class IdempotentRequest:
    merchant: str
    key: str
    method: str
    path: str
    # gateway.fingerprints: the request under each card key, newest first; never the body itself
    fingerprints: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """What the key's row keeps: the fingerprint under the newest key."""
        return self.fingerprints[0]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    location: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class CardInput:
    number: str
    cvv: str
    expiry_month: int
    expiry_year: int


async def _check_key(conn: store.Connection, req: IdempotentRequest) -> Response | None:
    """The stored response for this key, None if the key is new; raises if busy or reused."""
    return _stored(await store.lock_idempotency_key(conn, merchant=req.merchant, key=req.key), req)


def _stored(row: asyncpg.Record, req: IdempotentRequest) -> Response | None:
    """Read a row of lock_idempotency_key's columns: the replay, None, or why not."""
    if not row["locked"]:
        raise RequestInProgress()
    if row["fingerprint"] is None:
        return None
    if (row["method"], row["path"]) != (req.method, req.path) or not fingerprints.matches(
        row["fingerprint"], req.fingerprints
    ):
        raise IdempotencyKeyReused()
    return Response(row["response_status"], bytes(row["response_body"]), row["location"], replayed=True)


def authorization(
    vault: CardVault,
    req: IdempotentRequest,
    *,
    order_id: str,
    customer_id: str,
    amount: int,
    card: CardInput,
) -> store.Submission:
    """A new payment and its authorize operation, ready for submit_many: the card sealed, the
    command made, and the 202 the request is answered with once it is recorded."""
    payment_id = messages.new_id("pay")
    operation_id = messages.new_id("op")
    payment = Payment.pending(
        id=payment_id,
        order_id=order_id,
        customer_id=customer_id,
        amount=amount,
        card_brand=brand(card.number),
        card_last4=card.number[-4:],
        card_expiry_month=card.expiry_month,
        card_expiry_year=card.expiry_year,
        at=now(),
    )
    location = f"/v1/payments/{payment_id}"
    body = orjson.dumps(receipt(payment))
    cmd = messages.command(operation_id, OperationKind.AUTHORIZE.value)
    return store.Submission(
        payment_id=payment_id,
        order_id=order_id,
        customer_id=customer_id,
        amount=amount,
        card_brand=payment.card_brand,
        card_last4=payment.card_last4,
        card_expiry_month=card.expiry_month,
        card_expiry_year=card.expiry_year,
        at=payment.created_at,
        operation_id=operation_id,
        bank_key=operations.bank_key(operation_id),
        sealed_card=vault.seal(payment_id, card.number, card.cvv),
        command=cmd,
        reply=store.StoredReply(request=req, body=body, location=location),
    )


async def answer_authorization(
    pool: asyncpg.Pool, req: IdempotentRequest, submission: store.Submission, recorded: Awaitable[asyncpg.Record]
) -> Response:
    """The answer to one authorize request, from `recorded`: its submission's row of submit_many,
    as the API's batcher (gateway/api/routes.py) returns it. The 202, or the stored response
    of a twin request; raises the key's errors, or OrderAlreadyPaid."""
    try:
        outcome = await recorded
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name not in ("payments_one_live_per_order", "idempotency_keys_pkey"):
            raise
        async with pool.acquire() as conn:
            stored = await _recheck_key(conn, req)
            if stored:
                return stored
            existing = await store.live_payment_for_order(conn, merchant=req.merchant, order_id=submission.order_id)
        raise OrderAlreadyPaid(existing or "unknown") from None
    if not outcome["inserted"]:
        if not outcome["locked"]:
            raise RequestInProgress()
        async with pool.acquire() as conn:
            stored = await _recheck_key(conn, req)  # the key's response in full, or reused
        if stored is None:
            raise RuntimeError("idempotency key row vanished")  # keys are kept >= 24 h
        return stored
    crash_point("api.after_commit")
    return Response(202, submission.reply.body, submission.reply.location)


async def submit_many(pool: asyncpg.Pool, submissions: Sequence[store.Submission]) -> list[asyncpg.Record]:
    """Authorize requests recorded in one transaction: `locked` and `inserted` of each, in order."""
    return await store.submit_authorizations(pool, submissions=submissions)


async def _recheck_key(conn: store.Connection, req: IdempotentRequest) -> Response | None:
    """After a conflict: was it our own twin request, committed just before our key check?

    lock_idempotency_key reads the key row in the statement's snapshot, taken
    before the advisory lock: a twin that commits in between leaves us holding
    the lock without seeing its row, and we then collide with its work (the
    order's live payment, the new status). Looking again in a new statement
    turns that collision into the replay it should have been.
    """
    async with conn.transaction():
        return await _check_key(conn, req)


async def stored_response(pool: asyncpg.Pool, req: IdempotentRequest) -> Response | None:
    """The stored response for this key (raises if busy or reused), None if the key is new."""
    async with pool.acquire() as conn:
        return await _recheck_key(conn, req)


class ActionRequest(NamedTuple):
    """A capture, void or refund asked of the API: what request_actions takes. `context` is the
    request's own (its trace, its log fields): its command is made in it, wherever the batch runs."""

    request: IdempotentRequest
    payment_id: str
    action: Action
    amount: int | None
    context: contextvars.Context


# What request_actions answers for each request: the response, or why it is refused.
ActionOutcome: TypeAlias = (
    Response
    | RequestInProgress
    | IdempotencyKeyReused
    | PaymentNotFound
    | AmountMismatch
    | InvalidTransition
    | ReferenceUnknown
)
# The refusals of ActionOutcome: nothing is recorded for them, the key included (a request
# refused for a status or a missing bank reference is accepted once that has changed).
_REFUSALS = (
    RequestInProgress,
    IdempotencyKeyReused,
    PaymentNotFound,
    AmountMismatch,
    InvalidTransition,
    ReferenceUnknown,
)


def action_request(req: IdempotentRequest, payment_id: str, action: Action, amount: int | None) -> ActionRequest:
    """A capture, void or refund for request_actions, made in the current request's context."""
    return ActionRequest(req, payment_id, action, amount, contextvars.copy_context())


async def answer_action(pool: asyncpg.Pool, req: IdempotentRequest, outcome: ActionOutcome) -> Response:
    """The answer to one capture, void or refund, from its `outcome` in request_actions (as the
    API's batcher returns it): the 202, or the stored response of a twin request that moved the
    payment first; raises the refusal."""
    if isinstance(outcome, Response):
        crash_point("api.after_commit")
        return outcome
    if isinstance(outcome, InvalidTransition):
        async with pool.acquire() as conn:
            stored = await _recheck_key(conn, req)  # see _recheck_key: a twin may have moved the payment
        if stored:
            return stored
    raise outcome


async def request_actions(pool: asyncpg.Pool, asked: Sequence[ActionRequest]) -> list[ActionOutcome]:
    """Capture, void and refund requests in ONE transaction (two statements): each request's
    response, or the refusal the API turns into an error, in order.

    Each is decided as if the requests before it in the list had been handled first, as they
    would be one after the other: a second request with the same key finds it busy, a second
    one for the same payment finds the status the first one gave it.
    """
    async with pool.acquire() as conn, conn.transaction():
        rows = await store.lock_keys_and_payments(
            conn, requests=[store.KeyAndPayment(a.request.merchant, a.request.key, a.payment_id) for a in asked]
        )
        outcomes: list[ActionOutcome] = []
        starts: list[store.OperationStart] = []
        keys_taken: set[tuple[str, str]] = set()
        moved: dict[str, Status] = {}
        for a, row in zip(asked, rows, strict=True):
            try:
                if (a.request.merchant, a.request.key) in keys_taken:
                    raise RequestInProgress()
                keys_taken.add((a.request.merchant, a.request.key))
                outcomes.append(_stored(row, a.request) or a.context.run(_start, a, row, moved, starts))
            except _REFUSALS as exc:
                outcomes.append(exc)
        if starts and len(await store.start_operations(conn, starts=starts)) != len(starts):
            raise RuntimeError("a locked payment was not moved")  # rolls the whole batch back
    return outcomes


def _start(
    asked: ActionRequest, row: asyncpg.Record, moved: dict[str, Status], starts: list[store.OperationStart]
) -> Response:
    """One request's decision on its locked payment: the operation to start (added to `starts`)
    and the 202, or the refusal raised."""
    if row["id"] is None:
        raise PaymentNotFound()
    if asked.amount is not None and asked.amount != row["amount"]:
        raise AmountMismatch(row["amount"], asked.amount)
    references = {name: row[name] for name in domain.BANK_REFERENCES}
    running, kind = domain.start(moved.get(row["id"], Status(row["status"])), asked.action, references)
    payment, op_id, cmd = operations.begin(row, running, kind, at := now())
    body = orjson.dumps(payment)
    moved[row["id"]] = running
    starts.append(
        store.OperationStart(
            payment_id=row["id"],
            status=running,
            at=at,
            cause=f"api:{asked.action.value}",
            operation_id=op_id,
            kind=kind,
            bank_key=operations.bank_key(op_id),
            command=cmd,
            reply=store.StoredReply(request=asked.request, body=body),
        )
    )
    return Response(202, body)
