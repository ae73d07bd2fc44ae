"""The atomic phases of a payment. Each public function is ONE transaction.

API side:    authorize(), request_action()   record intent + outbox command
Worker side: claim(), record_outcome(), park(), release()
Many at once: submit_many(), claim_many(), record_many()   the same phases for several
             requests in one statement (gateway/batching.py sends them together)
Sweepers:    expire_hold(), purge_old_cards()
Ops:         settle_by_hand(), resolve(), set_reference(),   decisions a human took after
             abandon()                                       checking the bank (gatewayctl, /ops)

Each phase reads what it needs with the rows locked, asks the domain what
may happen, and writes every consequence (payment, history, operation,
outbox message, stored idempotent response) before it commits. There is
no state in between that a crash could leave half-written.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeAlias

import asyncpg
import orjson

from gateway import domain, fingerprints, messages, store
from gateway.cards import CardVault, SealedCard, brand
from gateway.crashpoints import crash_point
from gateway.domain import Action, InvalidTransition, OperationKind, ReferenceUnknown, Status, Verdict
from gateway.redact import clean
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


async def authorize(
    pool: asyncpg.Pool,
    vault: CardVault,
    req: IdempotentRequest,
    *,
    order_id: str,
    customer_id: str,
    amount: int,
    card: CardInput,
    submit: Callable[[store.Submission], Awaitable[asyncpg.Record]] | None = None,
) -> Response:
    """Record a new payment and its authorize operation; the bank is called later by a worker.
    `submit` records it (the API's gateway.batching.Batcher of submit_many); by default alone."""
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
    submission = store.Submission(
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
    try:
        outcome = await submit(submission) if submit else (await submit_many(pool, [submission]))[0]
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name not in ("payments_one_live_per_order", "idempotency_keys_pkey"):
            raise
        async with pool.acquire() as conn:
            stored = await _recheck_key(conn, req)
            if stored:
                return stored
            existing = await store.live_payment_for_order(conn, merchant=req.merchant, order_id=order_id)
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
    return Response(202, body, location)


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


async def request_action(
    pool: asyncpg.Pool,
    req: IdempotentRequest,
    payment_id: str,
    action: Action,
    amount: int | None,
    *,
    send: Callable[[ActionRequest], Awaitable[ActionOutcome]] | None = None,
) -> Response:
    """Capture, void or refund: move the payment to its in-progress status and enqueue the work.
    `send` records it (the API's gateway.batching.Batcher of request_actions); by default alone."""
    asked = ActionRequest(req, payment_id, action, amount, contextvars.copy_context())
    outcome = await send(asked) if send else (await request_actions(pool, [asked]))[0]
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
    payment, op_id, cmd = _begin(row, running, kind, at := now())
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
            bank_key=bank_key(op_id),
            command=cmd,
            reply=store.StoredReply(request=asked.request, body=body),
        )
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
    sealed_card: SealedCard | None
    unknown_outcomes: int = 0  # earlier attempts that may have done the work unbeknown to us
    lost_answers: Sequence[Mapping[str, Any]] = ()  # what is known of each (operations.lost_answers)
    rungs: int = 0  # retry-ladder rungs taken since it started or ops last replayed it
    forced: bool = False  # ops replayed it with --force: send an old authorization anyway
    # The payment row (with `history`) as it stood when the lease was taken: nothing else
    # changes it while the lease is held, so the outcome is recorded from it.
    payment: Mapping[str, Any] = field(default_factory=dict)


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


async def claim(
    pool: asyncpg.Pool,
    operation_id: str,
    owner: str,
    lease_seconds: float,
    take: Callable[[store.ClaimRequest], Awaitable[Claim | None]] | None = None,
) -> Claim | OperationState:
    """Take the lease for one bank attempt, or say why not (finished, leased elsewhere, unknown).
    `take` claims it (the worker's gateway.batching.Batcher of claim_many); by default alone."""
    request = store.ClaimRequest(operation_id, owner, lease_seconds)
    claimed = await take(request) if take else (await claim_many(pool, [request]))[0]
    return claimed if claimed is not None else await _why_not_claimed(pool, operation_id)


async def claim_many(pool: asyncpg.Pool, claims: Sequence[store.ClaimRequest]) -> list[Claim | None]:
    """The lease of each request, in one transaction: its Claim, or None when it cannot be
    claimed now (claim() says why)."""
    rows = await store.claim_operations(pool, claims=claims)
    by_owner = {row["owner"]: row for row in rows}
    return [_claim(by_owner[c.owner]) if c.owner in by_owner else None for c in claims]


def _claim(row: asyncpg.Record) -> Claim:
    return Claim(
        owner=row["owner"],
        operation_id=row["operation_id"],
        kind=OperationKind(row["operation_kind"]),
        bank_key=row["bank_key"],
        attempts=row["attempts"],
        first_attempt_at=row["first_attempt_at"],
        payment_id=row["id"],
        amount=row["amount"],
        authorization_id=row["authorization_id"],
        capture_id=row["capture_id"],
        card_expiry_month=row["card_expiry_month"],
        card_expiry_year=row["card_expiry_year"],
        sealed_card=SealedCard(row["card_key_id"], bytes(row["sealed"])) if row["sealed"] is not None else None,
        unknown_outcomes=row["unknown_outcomes"],
        lost_answers=row["lost_answers"] or (),
        rungs=row["rungs"],
        forced=row["forced_replay"],
        payment=dict(row),
    )


async def _why_not_claimed(pool: asyncpg.Pool, operation_id: str) -> OperationState:
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


async def release(
    pool: asyncpg.Pool,
    operation_id: str,
    owner: str,
    error: dict | None,
    bank_ms: int,
    report: store.AttemptReport,
    *,
    rung_taken: bool = False,
) -> None:
    """Give the lease back after attempts that settled nothing (transient failures), with the
    `report` of those not reported yet (note_many): how many are known to have done nothing at
    the bank, and what is known of the others, which may have done the work unbeknown to us.
    `rung_taken`: the operation goes to the next rung of the retry ladder (Claim.rungs)."""
    await store.release_lease(
        pool,
        operation_id=operation_id,
        owner=owner,
        error=error,
        bank_ms=bank_ms,
        report=report,
        rung_taken=rung_taken,
    )


async def note_many(pool: asyncpg.Pool, notes: Sequence[store.AttemptNote]) -> list[bool]:
    """Lease holders' reports of their latest attempts, in one statement, the leases kept: whether
    each was recorded (not when its lease is no longer its owner's)."""
    noted = await store.note_attempts(pool, notes=notes)
    return [n.operation_id in noted for n in notes]


async def kinds_tried(pool: asyncpg.Pool, payment_id: str, operation_id: str) -> frozenset[OperationKind]:
    """The kinds of the payment's other operations that were ever sent to the bank."""
    return await store.operation_kinds_tried(pool, payment_id=payment_id, operation_id=operation_id)


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


@dataclass(frozen=True)
class Settlement:
    """A claimed operation's final verdict, ready to record: the payment as it will read, and
    what the recording writes."""

    claim: Claim
    payment: dict  # as GET will show it once recorded
    finish: store.Finish
    doubt: domain.Doubt | None
    follow_up: OperationKind | None
    fields: dict[str, Any]  # the bank's ids copied onto the receipt

    @property
    def alone(self) -> bool:
        """One statement records it (finish_operations), so it can go with others'."""
        return self.doubt is None and self.follow_up is None


def settlement(
    claim: Claim, verdict: Verdict, outcome: domain.BankOutcome, bank_ms: int, doubt: domain.Doubt | None = None
) -> Settlement:
    """What recording `verdict` for the claim writes, built from the claim's snapshot of the
    payment: the operation, the payment, history, card deletion, completion event and the long
    polls' wake-up; with a `doubt` (domain: outcomes the bank will not name), or a follow-up
    operation the domain asks for, those too."""
    row, kind = claim.payment, claim.kind
    status = domain.settle(kind, verdict)
    at = now()
    error: dict | None
    if doubt is not None:
        error = doubt.error()
    else:
        error = None if verdict is Verdict.SUCCEEDED else domain.error_for(outcome, kind)
    fields = _bank_fields(kind, verdict, outcome.body)
    moved = status.value != row["status"]
    updated = {
        **row,
        **fields,
        "status": status.value,
        "last_error": error,
        # A flag is cleared by the human who looked (unpark, resolve), not by later work.
        "attention_required": row["attention_required"] or doubt is not None,
        "updated_at": at,
    }
    payment = payment_json(updated)
    if moved:
        payment["history"].append({"status": status.value, "at": payment["updated_at"]})
    finish = store.Finish(
        operation_id=claim.operation_id,
        owner=claim.owner,
        operation_status="succeeded" if verdict is Verdict.SUCCEEDED else "failed",
        at=at,
        error=error,
        bank_response=outcome.body,
        bank_ms=bank_ms,
        payment_status=status,
        cause=f"bank:{kind.value}:{verdict.value}" + (f":{doubt.code}" if doubt else ""),
        status_moved=moved,
        drop_card=kind is OperationKind.AUTHORIZE,
        event=messages.event(domain.event_type(status), payment, at, merchant=row["merchant"]) if moved else None,
        notify=wake_up(payment),
        **fields,
    )
    return Settlement(claim, payment, finish, doubt, domain.follow_up(kind, verdict), fields)


async def record_outcome(
    pool: asyncpg.Pool,
    claim: Claim,
    verdict: Verdict,
    outcome: domain.BankOutcome,
    bank_ms: int,
    doubt: domain.Doubt | None = None,
    record: Callable[[Settlement], Awaitable[dict | None]] | None = None,
) -> dict | None:
    """Settle a claimed operation with a final verdict. Returns the payment, or None when the
    lease is no longer the claim's (another handling records the outcome). `record` records a
    settlement that goes `alone` (the worker's gateway.batching.Batcher of record_many); by
    default in a statement of its own."""
    settled = settlement(claim, verdict, outcome, bank_ms, doubt)
    if settled.alone:
        return await record(settled) if record else (await record_many(pool, [settled]))[0]
    return await _record_with_doubt_or_follow_up(pool, settled)


async def record_many(pool: asyncpg.Pool, settlements: Sequence[Settlement]) -> list[dict | None]:
    """Settlements that each record `alone`, in one statement: each one's payment, or None when
    its lease is no longer its claim's."""
    recorded = await store.finish_operations(pool, finishes=[s.finish for s in settlements])
    return [s.payment if (s.claim.operation_id, s.claim.owner) in recorded else None for s in settlements]


async def _record_with_doubt_or_follow_up(pool: asyncpg.Pool, settled: Settlement) -> dict | None:
    """A settlement that does not record `alone`: one transaction with the doubt's flag and
    finding, and the follow-up operation."""
    claim, doubt, payment = settled.claim, settled.doubt, settled.payment
    at, merchant = settled.finish.at, claim.payment["merchant"]
    async with pool.acquire() as conn, conn.transaction():
        if not await store.finish_operations(conn, finishes=[settled.finish]):
            return None
        if doubt is not None:
            await store.flag_doubt(
                conn,
                payment_id=claim.payment_id,
                at=at,
                error=doubt.error(),
                event=messages.event(domain.ATTENTION_EVENT, payment, at, merchant=merchant),
                run_id=f"worker:{claim.operation_id}",
                finding_kind=doubt.finding,
                finding_detail={
                    "operation_id": claim.operation_id,
                    "bank_key": claim.bank_key,
                    **settled.fields,
                    "note": doubt.message,
                    **doubt.evidence,
                },
            )
        if settled.follow_up is not None:
            await _enqueue(conn, claim.payment_id, settled.follow_up, at)
    return payment


# NOTIFY payloads are limited to 8000 bytes; a payment too large to send is re-read.
_WAKE_UP_LIMIT = 7900


def wake_up(payment: dict) -> str:
    """The long polls' wake-up for this payment: its id (`pay_` and hex), a space, then the
    payment as GET shows it (just the id when that does not fit a NOTIFY payload)."""
    text = f"{payment['id']} {orjson.dumps(payment).decode()}"
    return text if len(text) <= _WAKE_UP_LIMIT else payment["id"]


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
        event = messages.event(domain.ATTENTION_EVENT, payment, at, merchant=row["merchant"])
        await store.park_operation(conn, operation_id=operation_id, at=at, error=error, event=event)
    return payment


async def unpark(pool: asyncpg.Pool, operation_id: str, *, forced: bool) -> bool:
    """Back from the dead-letter queue (forced: an authorization past the key horizon is sent
    anyway): False when the operation has meanwhile finished."""
    return await store.unpark_operation(pool, operation_id=operation_id, forced=forced)


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
        event = messages.event(domain.event_type(status), payment, at, merchant=row["merchant"])
        start = store.OperationStart(
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
                payment = payment_json({**row, "attention_required": True, "last_error": error, "updated_at": at})
                event = messages.event(domain.ATTENTION_EVENT, payment, at, merchant=row["merchant"])
            await store.purge_card(
                conn, payment_id=row["payment_id"], operation_id=row["operation_id"], at=at, error=error, event=event
            )
    return [r["payment_id"] for r in rows]


# ---- ops phases -----------------------------------------------------------------------


class OpsRefused(Exception):
    """An ops decision that does not fit the payment as it is now; the message says why."""


@dataclass(frozen=True)
class OpsDecision:
    """What an ops phase did."""

    payment: dict  # the receipt afterwards
    cause: str  # its history row's cause: who and why
    operation_id: str | None = None  # the operation it decided (settle, abandon)
    kind: OperationKind | None = None
    follow_up: str | None = None  # the operation it started: abandon's void of the hold


_OPERATOR = re.compile(r"[A-Za-z0-9._@-]{1,64}")
CAUSE_LIMIT = 300  # characters of a history cause
REASON_LIMIT = 500  # characters of a reason kept in last_error
# The reconciliation finding an abandoned authorization leaves: the bank may
# hold a hold that nobody can name (it lapses by itself at its expiry).
ABANDONED_AUTHORIZATION = "abandoned_authorization"


def ops_cause(by: str, act: str, reason: str) -> str:
    """The history cause of an ops decision, `ops:<by>:<act>:<reason>`, redacted and bounded.

    Raises ValueError for a name that is not a plain login-like token or an empty reason.
    """
    if not _OPERATOR.fullmatch(by):
        raise ValueError("the operator's name must be 1-64 letters, digits or . _ @ -")
    words = " ".join(reason.split())
    if not words:
        raise ValueError("a reason is required")
    return clean(f"ops:{by}:{act}:{words}", CAUSE_LIMIT)


def _ops_error(code: str, reason: str) -> dict:
    return {"code": code, "message": clean(" ".join(reason.split()), REASON_LIMIT), "retryable": False}


def _parked(row: asyncpg.Record | None, operation_id: str) -> asyncpg.Record:
    """The locked operation row, if it is parked and nobody is calling the bank for it."""
    if row is None:
        raise OpsRefused(f"no operation {operation_id}")
    if row["operation_status"] != "pending":
        raise OpsRefused(f"operation {operation_id} is already final ({row['operation_status']}): nothing to decide")
    if row["leased"]:
        raise OpsRefused(
            f"operation {operation_id} is in flight: a worker holds its lease and may be calling the bank "
            "right now; wait until it settles or is parked"
        )
    if not row["parked"]:
        raise OpsRefused(
            f"operation {operation_id} is in flight (not parked): the worker is still retrying it; wait until "
            "it settles or is parked (gatewayctl dlq list)"
        )
    return row


async def settle_by_hand(
    pool: asyncpg.Pool, operation_id: str, *, succeeded: bool, reason: str, by: str, bank_id: str | None = None
) -> OpsDecision:
    """Ops checked the bank: record a parked operation's outcome as the worker would have.

    The payment's status comes from domain.settle (succeeded, or refused for
    "failed"); the sealed card is deleted, the completion event goes through
    the outbox and a history row names who and why. A success without the
    bank's id keeps attention_required (the reference is unknown: `resolve`
    fills it). Raises OpsRefused (unknown, final, in flight) or ValueError
    (a bad name, reason or bank id).
    """
    cause = ops_cause(by, "settle", reason)
    verdict = Verdict.SUCCEEDED if succeeded else Verdict.REFUSED
    if bank_id is not None and not succeeded:
        raise ValueError("a bank id only goes with a success")
    async with pool.acquire() as conn, conn.transaction():
        row = _parked(await store.ops_lock_operation(conn, operation_id=operation_id), operation_id)
        kind = OperationKind(row["kind"])
        status = domain.settle(kind, verdict)
        if row["status"] != domain.RUNNING_STATUS[kind].value:
            raise OpsRefused(f"payment {row['id']} is {row['status']}, not {domain.RUNNING_STATUS[kind].value}")
        references = store.BankReferences()
        if bank_id is not None:
            field = domain.REFERENCE_OF[kind]
            problem = domain.reference_problem(field, bank_id, status)
            if problem:
                raise ValueError(problem)
            references = store.BankReferences(**{field: bank_id})
        error = None if succeeded else _ops_error(domain.SETTLED_BY_OPS, reason)
        attention = succeeded and bank_id is None
        at = now()
        moved = status.value != row["status"]
        filled = {name: row[name] or value for name, value in references._asdict().items() if value}
        updated = {
            **row,
            **filled,
            "status": status.value,
            "last_error": error,
            "attention_required": attention,
            "updated_at": at,
        }
        payment = payment_json(updated)
        if moved:
            payment["history"].append({"status": status.value, "at": payment["updated_at"]})
        finished = await store.ops_finish_operation(
            conn,
            operation_id=operation_id,
            operation_status="succeeded" if succeeded else "failed",
            at=at,
            error=error,
            payment_status=status,
            attention_required=attention,
            references=references,
            cause=cause,
            event=messages.event(domain.event_type(status), payment, at, merchant=row["merchant"]) if moved else None,
        )
        if not finished:  # cannot happen under the row locks; never report a decision not recorded
            raise OpsRefused(f"operation {operation_id} changed meanwhile; look again")
    return OpsDecision(payment, cause, operation_id, kind)


async def resolve(
    pool: asyncpg.Pool, payment_id: str, *, reason: str, by: str, references: dict[str, str] | None = None
) -> OpsDecision:
    """Ops clears attention_required on a payment with nothing in flight, filling missing bank ids.

    A reference is only written into a column that is empty, and must fit the
    payment's status (domain.reference_problem). The status does not move; a
    history row names who and why. Raises OpsRefused (unknown payment,
    something in flight, a reference already there or not fitting, nothing
    to do) or ValueError (a bad name or reason).
    """
    cause = ops_cause(by, "resolve", reason)
    references = references or {}

    def check(row: asyncpg.Record) -> None:
        if not row["attention_required"] and not references:
            raise OpsRefused(f"payment {payment_id} is not flagged and no bank id was given: nothing to resolve")

    return await _record_references(pool, payment_id, references, cause, clear_flag=True, check=check)


async def close_lapsed_doubt(pool: asyncpg.Pool, payment_id: str, *, reason: str) -> OpsDecision:
    """Clear a possible-second-hold flag because that hold has lapsed at the bank: nothing is left
    for an operator to void. Refused (OpsRefused) when the flag is gone or stands for something
    else by now, or an operation is in flight; the history row says `ops:sweeper:lapsed:<reason>`."""
    cause = ops_cause("sweeper", "lapsed", reason)

    def check(row: asyncpg.Record) -> None:
        error = row["last_error"] or {}
        if not row["attention_required"] or error.get("code") != domain.POSSIBLE_DUPLICATE_HOLD:
            raise OpsRefused(f"payment {payment_id} is no longer flagged for a possible second hold")

    return await _record_references(pool, payment_id, {}, cause, clear_flag=True, check=check)


async def set_reference(
    pool: asyncpg.Pool, payment_id: str, name: str, value: str, *, reason: str, by: str
) -> OpsDecision:
    """Ops records the bank reference `name` (authorization_id, capture_id, void_id, refund_id) found at
    the bank, which the receipt lacks because the bank forgot our key: the steps sent with it
    (domain.start) are accepted again. Written only where the receipt has none and its status has
    one, with its shape checked (domain.reference_problem); the status and attention_required do
    not move (`resolve` clears the flag once everything about the payment has been checked); a
    history row `ops:<by>:set-reference:<name>=<value> <reason>`. Raises OpsRefused (unknown
    payment, something in flight, the reference there already or not fitting) or ValueError (a bad
    name or reason).
    """
    ops_cause(by, "set-reference", reason)  # a bad name or an empty reason
    problem = domain.reference_problem(name, value)
    if problem:
        raise ValueError(problem)
    cause = ops_cause(by, "set-reference", f"{name}={value} {reason}")
    return await _record_references(pool, payment_id, {name: value}, cause, clear_flag=False)


async def _record_references(
    pool: asyncpg.Pool,
    payment_id: str,
    references: dict[str, str],
    cause: str,
    *,
    clear_flag: bool,
    check: Callable[[asyncpg.Record], None] | None = None,
) -> OpsDecision:
    """resolve's and set_reference's transaction: the payment locked, nothing in flight, each
    reference fitting its status and never overwriting one; then the references (and the flag
    cleared, with `clear_flag`) and the history row."""
    async with pool.acquire() as conn, conn.transaction():
        row = await store.reconcile_lock_payment(conn, payment_id=payment_id)
        if row is None:
            raise OpsRefused(f"no payment {payment_id}")
        if row["busy"]:
            raise OpsRefused(
                f"payment {payment_id} has an operation in flight: settle or abandon it, or wait for it "
                "(gatewayctl dlq list)"
            )
        for name, value in references.items():
            problem = domain.reference_problem(name, value, Status(row["status"]))
            if problem:
                raise OpsRefused(problem)
            if row[name] is not None:
                raise OpsRefused(f"the receipt already has {name} {row[name]}: a bank id is never overwritten")
        if check is not None:
            check(row)
        at = now()
        if not await store.ops_resolve_payment(
            conn,
            payment_id=payment_id,
            at=at,
            references=store.BankReferences(**references),
            clear_flag=clear_flag,
            cause=cause,
        ):  # cannot happen under the row lock; never report a decision not recorded
            raise OpsRefused(f"payment {payment_id} changed meanwhile; look again")
    flag = row["attention_required"] and not clear_flag
    return OpsDecision(payment_json({**row, **references, "attention_required": flag, "updated_at": at}), cause)


async def abandon(
    pool: asyncpg.Pool, payment_id: str, *, reason: str, by: str, parked_at_least: timedelta
) -> OpsDecision:
    """Ops gives up on a payment whose operation has been parked for at least `parked_at_least`.

    What happens is domain.abandon's: the operation fails with last_error
    `abandoned` and the reason; the card is purged; the payment declines
    (authorize), starts voiding the hold with a new VOID (capture, void),
    returns to captured (refund) or stays expired (release), with a history
    row naming who and why and the event of the status it enters. An
    abandoned authorization also leaves a reconciliation finding: the bank
    may hold a hold we cannot name, which lapses by itself.
    Raises OpsRefused (unknown payment, nothing parked, parked too recently)
    or ValueError (a bad name or reason).
    """
    cause = ops_cause(by, "abandon", reason)
    in_flight = [
        o["id"] for o in await store.ops_payment_operations(pool, payment_id=payment_id) if o["status"] == "pending"
    ]
    if not in_flight:
        found = await store.ops_payment(pool, payment_id=payment_id)
        if found is None:
            raise OpsRefused(f"no payment {payment_id}")
        raise OpsRefused(f"payment {payment_id} ({found['status']}) has no operation in flight: nothing to abandon")
    async with pool.acquire() as conn, conn.transaction():
        row = _parked(await store.ops_lock_operation(conn, operation_id=in_flight[0]), in_flight[0])
        wait = parked_at_least.total_seconds()
        if row["parked_seconds"] < wait:
            raise OpsRefused(
                f"operation {row['operation_id']} has been parked for {row['parked_seconds'] / 3600:.1f} h; a "
                f"payment may be abandoned once parked for {wait / 3600:g} h. Until then replay it "
                "(gatewayctl dlq replay) or, after checking the bank, settle it (gatewayctl settle)"
            )
        kind = OperationKind(row["kind"])
        try:
            plan = domain.abandon(kind, Status(row["status"]))
        except domain.InvalidTransition as exc:
            raise OpsRefused(str(exc)) from None
        error = _ops_error(domain.ABANDONED, reason)
        at = now()
        moved = plan.status.value != row["status"]
        updated = {
            **row,
            "status": plan.status.value,
            "last_error": error,
            "attention_required": False,
            "updated_at": at,
        }
        payment = payment_json(updated)
        if moved:
            payment["history"].append({"status": plan.status.value, "at": payment["updated_at"]})
        announce = moved and plan.status in domain.EVENT_STATUSES
        finished = await store.ops_finish_operation(
            conn,
            operation_id=row["operation_id"],
            operation_status="failed",
            at=at,
            error=error,
            payment_status=plan.status,
            attention_required=False,
            references=store.BankReferences(),
            cause=cause,
            event=(
                messages.event(domain.event_type(plan.status), payment, at, merchant=row["merchant"])
                if announce
                else None
            ),
        )
        if not finished:  # cannot happen under the row locks; never report a decision not recorded
            raise OpsRefused(f"operation {row['operation_id']} changed meanwhile; look again")
        follow_up = await _enqueue(conn, payment_id, plan.follow_up, at) if plan.follow_up is not None else None
        if kind is OperationKind.AUTHORIZE:
            await store.insert_finding(
                conn,
                run_id=messages.new_id("ops"),
                payment_id=payment_id,
                kind=ABANDONED_AUTHORIZATION,
                detail={
                    "operation_id": row["operation_id"],
                    "bank_key": row["bank_key"],
                    "amount": row["amount"],
                    "by": by,
                    "reason": error["message"],
                    "note": "abandoned without knowing whether the bank placed a hold; one placed lapses "
                    "by itself at its expiry",
                },
                repaired=False,
                found_at=at,
            )
    return OpsDecision(payment, cause, row["operation_id"], kind, follow_up)
