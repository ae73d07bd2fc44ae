"""The atomic phases of a payment. Each public function is ONE transaction.

API side:    authorize(), request_action()   record intent + outbox command
Worker side: claim(), record_outcome(), park(), release()
Sweepers:    expire_hold()

Each phase reads what it needs with the rows locked, asks the domain what
may happen, and writes every consequence (payment, history, operation,
outbox message, stored idempotent response) before it commits. There is
no state in between that a crash could leave half-written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from gateway import domain, messages, store
from gateway.cards import CardVault, brand
from gateway.crashpoints import crash_point
from gateway.domain import Action, OperationKind, Status, Verdict
from gateway.timefmt import iso, now, parse
from gateway.views import payment_json

# ---- errors the API turns into responses --------------------------------------------


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


# ---- API phases ---------------------------------------------------------------------


@dataclass(frozen=True)
class IdempotentRequest:
    merchant: str
    key: str
    method: str
    path: str
    body: bytes

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.method.encode(), self.path.encode(), self.body):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest.hexdigest()


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
    if row["fingerprint"] != req.fingerprint:
        raise IdempotencyKeyReused()
    return Response(row["response_status"], bytes(row["response_body"]), row["location"], replayed=True)


async def authorize(
    pool: asyncpg.Pool,
    vault: CardVault,
    req: IdempotentRequest,
    *,
    order_id: str,
    customer_id: str,
    amount: int,
    card: CardInput,
) -> Response:
    """Record a new payment and its authorize operation; the bank is called later by a worker."""
    payment_id = messages.new_id("pay")
    operation_id = messages.new_id("op")
    at = now()
    card_brand, card_last4 = brand(card.number), card.number[-4:]
    row: dict[str, Any] = {
        "id": payment_id,
        "order_id": order_id,
        "customer_id": customer_id,
        "amount": amount,
        "currency": "USD",
        "status": Status.PENDING.value,
        "card_brand": card_brand,
        "card_last4": card_last4,
        "card_expiry_month": card.expiry_month,
        "card_expiry_year": card.expiry_year,
        "authorization_id": None,
        "authorization_expires_at": None,
        "capture_id": None,
        "void_id": None,
        "refund_id": None,
        "last_error": None,
        "attention_required": False,
        "created_at": at,
        "updated_at": at,
    }
    row["history"] = [{"status": Status.PENDING.value, "at": iso(at)}]
    location = f"/v1/payments/{payment_id}"
    body = orjson.dumps(payment_json(row))
    cmd = messages.command(operation_id, OperationKind.AUTHORIZE.value)
    async with pool.acquire() as conn:
        try:
            outcome = await store.submit_authorization(
                conn,
                payment_id=payment_id,
                order_id=order_id,
                customer_id=customer_id,
                amount=amount,
                card_brand=card_brand,
                card_last4=card_last4,
                card_expiry_month=card.expiry_month,
                card_expiry_year=card.expiry_year,
                at=at,
                operation_id=operation_id,
                bank_key=bank_key(operation_id),
                sealed_card=vault.seal(payment_id, card.number, card.cvv),
                command=cmd,
                reply=store.StoredReply(request=req, body=body, location=location),
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name not in ("payments_one_live_per_order", "idempotency_keys_pkey"):
                raise
            stored = await _recheck_key(conn, req)
            if stored:
                return stored
            existing = await store.live_payment_for_order(conn, merchant=req.merchant, order_id=order_id)
            raise OrderAlreadyPaid(existing or "unknown") from None
        if not outcome["inserted"]:
            if not outcome["locked"]:
                raise RequestInProgress()
            stored = await _recheck_key(conn, req)  # the key's response in full, or reused
            if stored is None:
                raise RuntimeError("idempotency key row vanished")  # keys are kept >= 24 h
            return stored
    crash_point("api.after_commit")
    return Response(202, body, location)


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


async def request_action(
    pool: asyncpg.Pool, req: IdempotentRequest, payment_id: str, action: Action, amount: int | None
) -> Response:
    """Capture, void or refund: move the payment to its in-progress status and enqueue the work."""
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                response = await _request_action(conn, req, payment_id, action, amount)
            crash_point("api.after_commit")
            return response
        except domain.InvalidTransition:
            stored = await _recheck_key(conn, req)  # see _recheck_key: a twin may have moved the payment
            if stored:
                return stored
            raise


async def _request_action(
    conn: store.Connection, req: IdempotentRequest, payment_id: str, action: Action, amount: int | None
) -> Response:
    row = await store.lock_key_and_payment(conn, merchant=req.merchant, key=req.key, payment_id=payment_id)
    stored = _stored(row, req)
    if stored:
        return stored
    if row["id"] is None:
        raise PaymentNotFound()
    if amount is not None and amount != row["amount"]:
        raise AmountMismatch(row["amount"], amount)
    running, kind = domain.request(Status(row["status"]), action)
    payment, op_id, cmd = _begin(row, running, kind, at := now())
    body = orjson.dumps(payment)
    await store.start_operation(
        conn,
        payment_id=payment_id,
        status=running,
        at=at,
        cause=f"api:{action.value}",
        operation_id=op_id,
        kind=kind,
        bank_key=bank_key(op_id),
        command=cmd,
        reply=store.StoredReply(request=req, body=body),
    )
    return Response(202, body)


def _begin(row: asyncpg.Record, status: Status, kind: OperationKind, at: datetime):
    """The payment as it will read once `status` is entered, a new operation id and its command."""
    updated = {**row, "status": status.value, "last_error": None, "updated_at": at}
    payment = payment_json(updated)
    if status.value != row["status"]:
        payment["history"].append({"status": status.value, "at": payment["updated_at"]})
    op_id = messages.new_id("op")
    return payment, op_id, messages.command(op_id, kind.value)


def bank_key(operation_id: str) -> str:
    """The bank idempotency key: derived from our own operation id, stable across every retry."""
    return f"gw-{operation_id}"


# ---- worker phases ------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    owner: str  # who holds the lease: one handling of one message
    operation_id: str
    kind: OperationKind
    bank_key: str
    attempts: int
    first_attempt_at: datetime
    payment_id: str
    amount: int
    authorization_id: str | None
    capture_id: str | None
    card_expiry_month: int
    card_expiry_year: int
    sealed_card: bytes | None


@dataclass(frozen=True)
class OperationState:
    """Why an operation could not be claimed."""

    exists: bool
    finished: bool = False
    parked: bool = False
    lease_left: float = 0.0
    kind: str | None = None
    payment_id: str | None = None
    attempts: int = 0
    last_error: dict | None = None


async def claim(pool: asyncpg.Pool, operation_id: str, owner: str, lease_seconds: float) -> Claim | OperationState:
    """Take the lease for one bank attempt, or say why not (finished, leased elsewhere, unknown)."""
    row = await store.claim_operation(pool, operation_id=operation_id, owner=owner, lease_seconds=lease_seconds)
    if row is not None:
        return Claim(
            owner=owner,
            operation_id=row["id"],
            kind=OperationKind(row["kind"]),
            bank_key=row["bank_key"],
            attempts=row["attempts"],
            first_attempt_at=row["first_attempt_at"],
            payment_id=row["payment_id"],
            amount=row["amount"],
            authorization_id=row["authorization_id"],
            capture_id=row["capture_id"],
            card_expiry_month=row["card_expiry_month"],
            card_expiry_year=row["card_expiry_year"],
            sealed_card=bytes(row["sealed"]) if row["sealed"] is not None else None,
        )
    state = await store.operation_state(pool, operation_id=operation_id)
    if state is None:
        return OperationState(exists=False)
    return OperationState(
        exists=True,
        finished=state["status"] != "pending",
        parked=state["parked"],
        lease_left=state["lease_left"] or 0.0,
        kind=state["kind"],
        payment_id=state["payment_id"],
        attempts=state["attempts"],
        last_error=state["last_error"],
    )


async def release(pool: asyncpg.Pool, operation_id: str, owner: str, error: dict | None, bank_ms: int) -> None:
    """Give the lease back after an attempt that settled nothing (a transient failure)."""
    await store.release_lease(pool, operation_id=operation_id, owner=owner, error=error, bank_ms=bank_ms)


# Bank response fields copied onto the receipt, per operation.
_BANK_IDS = {
    OperationKind.AUTHORIZE: ("authorization_id", "expires_at"),
    OperationKind.CAPTURE: ("capture_id",),
    OperationKind.VOID: ("void_id",),
    OperationKind.RELEASE: ("void_id",),
    OperationKind.REFUND: ("refund_id",),
}


def _bank_fields(kind: OperationKind, verdict: Verdict, body: dict | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if verdict is not Verdict.SUCCEEDED or not body:
        return fields
    for name in _BANK_IDS[kind]:
        if name == "expires_at":
            fields["authorization_expires_at"] = parse(body["expires_at"])
        else:
            fields[name] = body[name]
    return fields


async def record_outcome(
    pool: asyncpg.Pool,
    operation_id: str,
    verdict: Verdict,
    outcome: domain.BankOutcome,
    bank_ms: int,
) -> dict | None:
    """Settle an operation with a final verdict. Returns the payment, or None if already settled.

    One transaction: operation, payment, history, card deletion, completion
    event and, where the domain asks for it, the follow-up operation.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_operation(conn, operation_id=operation_id)
        if row is None:
            return None
        kind = OperationKind(row["kind"])
        status = domain.settle(kind, verdict)
        at = now()
        error = None if verdict is Verdict.SUCCEEDED else domain.error_for(outcome, kind)
        fields = _bank_fields(kind, verdict, outcome.body)
        moved = status.value != row["status"]
        updated = {
            **row,
            **fields,
            "status": status.value,
            "last_error": error,
            "attention_required": False,
            "updated_at": at,
        }
        payment = payment_json(updated)
        if moved:
            payment["history"].append({"status": status.value, "at": payment["updated_at"]})
        event = messages.event(domain.event_type(status), payment, at) if moved else None
        await store.finish_operation(
            conn,
            operation_id=operation_id,
            operation_status="succeeded" if verdict is Verdict.SUCCEEDED else "failed",
            at=at,
            error=error,
            bank_response=outcome.body,
            bank_ms=bank_ms,
            payment_status=status,
            cause=f"bank:{kind.value}:{verdict.value}",
            status_moved=moved,
            drop_card=kind is OperationKind.AUTHORIZE,
            event=event,
            authorization_id=fields.get("authorization_id"),
            authorization_expires_at=fields.get("authorization_expires_at"),
            capture_id=fields.get("capture_id"),
            void_id=fields.get("void_id"),
            refund_id=fields.get("refund_id"),
        )
        follow_up = domain.follow_up(kind, verdict)
        if follow_up is not None:
            await _enqueue(conn, row["id"], follow_up, at)
    return payment


async def _enqueue(conn: store.Connection, payment_id: str, kind: OperationKind, at: datetime) -> str:
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


async def park(pool: asyncpg.Pool, operation_id: str, error: dict) -> dict | None:
    """Retries are exhausted: flag the payment for ops and announce it. None if already settled."""
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_operation(conn, operation_id=operation_id)
        if row is None:
            return None
        at = now()
        payment = payment_json({**row, "attention_required": True, "last_error": error, "updated_at": at})
        event = messages.event(domain.ATTENTION_EVENT, payment, at)
        await store.park_operation(conn, operation_id=operation_id, at=at, error=error, event=event)
    return payment


async def unpark(pool: asyncpg.Pool, operation_id: str) -> bool:
    """Back from the dead-letter queue: False when the operation has meanwhile finished."""
    return await store.unpark_operation(pool, operation_id=operation_id)


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
        payment, op_id, cmd = _begin(row, status, kind, at := now())
        event = messages.event(domain.event_type(status), payment, at)
        await store.start_operation(
            conn,
            payment_id=payment_id,
            status=status,
            at=at,
            cause="sweeper:hold_expired",
            operation_id=op_id,
            kind=kind,
            bank_key=bank_key(op_id),
            command=cmd,
            event=event,
        )
    return payment
