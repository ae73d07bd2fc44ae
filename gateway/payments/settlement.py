"""Settlement: a worker's side of an operation. It claims the lease for a bank attempt, reports
attempts that settled nothing, and records what the bank's final answer does to the payment:
the operation, the payment's status and bank ids, history, the card deleted, the completion
event and the long polls' wake-up, in one transaction; with a doubt (an outcome the bank will
not name) the flag and the finding, and the follow-up operation the domain asks for. An
operation whose retries are exhausted is parked for ops, and unparked when ops replay it.

The domain (gateway.domain) says what each answer means; this module decides what it does to
the payment (the doubt it leaves, an "already done" proven our own work, the follow-up) and
writes it. The worker's handling (worker/handling.py) only chooses when: record, retry or park.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from gateway import domain, messages, store
from gateway.cards import SealedCard
from gateway.domain import OperationKind, Payment, Verdict
from gateway.payments import operations
from gateway.timefmt import iso, now, parse
from gateway.views import receipt


@dataclass(frozen=True)
class Claim:
    owner: str  # who holds the lease: one handling of one message
    operation_id: str
    kind: OperationKind
    bank_key: str
    attempts: int
    first_attempt_at: datetime
    sealed_card: SealedCard | None
    # The payment as it stood when the lease was taken: nothing else changes it while the
    # lease is held, so the bank call is sent with it and the outcome recorded from it.
    payment: Payment
    merchant: str
    unknown_outcomes: int = 0  # earlier attempts that may have done the work unbeknown to us
    lost_answers: Sequence[Mapping[str, Any]] = ()  # what is known of each (operations.lost_answers)
    rungs: int = 0  # retry-ladder rungs taken since it started or ops last replayed it
    forced: bool = False  # ops replayed it with --force: send an old authorization anyway


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


async def claim_many(pool: asyncpg.Pool, claims: Sequence[store.ClaimRequest]) -> list[Claim | None]:
    """The lease of each request for one bank attempt, in one transaction: its Claim, or None
    when it cannot be claimed now (why_not_claimed says why)."""
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
        sealed_card=SealedCard(row["card_key_id"], bytes(row["sealed"])) if row["sealed"] is not None else None,
        payment=Payment.from_row(row),
        merchant=row["merchant"],
        unknown_outcomes=row["unknown_outcomes"],
        lost_answers=row["lost_answers"] or (),
        rungs=row["rungs"],
        forced=row["forced_replay"],
    )


async def why_not_claimed(pool: asyncpg.Pool, operation_id: str) -> OperationState:
    """Finished, parked, leased elsewhere or unknown: what stopped its claim."""
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


def doubt_of(
    claim: Claim, outcome: domain.BankOutcome, *, unknown_before: int, lost: Sequence[Mapping[str, Any]]
) -> domain.Doubt | None:
    """What a final answer leaves in doubt, recorded with it: for an authorization, maybe a second
    hold (domain.doubt_of_approval), named as ops would look for its twin at the bank.
    `unknown_before`, `lost`: the earlier attempts whose outcome we never learnt."""
    if claim.kind is not OperationKind.AUTHORIZE:
        return None
    card = f"{claim.payment.card_brand} ending {claim.payment.card_last4}"
    hold = domain.Hold(claim.payment.amount, card, (outcome.body or {}).get("authorization_id"), iso(now()))
    return domain.doubt_of_approval(outcome, unknown_before=unknown_before, lost=lost, hold=hold)


async def proves_own_work(
    pool: asyncpg.Pool, claim: Claim, refusal: domain.BankOutcome, *, unknown_before: int
) -> bool:
    """Still "already done" when asked again with our key: whether the domain's proof holds that
    the work is our own earlier attempt's (then recorded by own_work), given the kinds of the
    payment's other operations ever sent to the bank. False: nobody can tell whether the money
    moved."""
    tried = await store.operation_kinds_tried(pool, payment_id=claim.payment.id, operation_id=claim.operation_id)
    return domain.proves_own_work(claim.kind, refusal.code, unknown_before=unknown_before, other_kinds_tried=tried)


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
    """What recording `verdict` for the claim writes, built from the claim's payment: the
    operation, the payment, history, card deletion, completion event and the long polls'
    wake-up; with a `doubt` (domain: outcomes the bank will not name), or a follow-up
    operation the domain asks for, those too."""
    before, kind = claim.payment, claim.kind
    status = domain.settle(kind, verdict)
    at = now()
    error: dict | None
    if doubt is not None:
        error = doubt.error()
    else:
        error = None if verdict is Verdict.SUCCEEDED else domain.error_for(outcome, kind)
    fields = _bank_fields(kind, verdict, outcome.body)
    moved = status is not before.status
    after = before.entering(
        status,
        at,
        **fields,
        last_error=error,
        # A flag is cleared by the human who looked (unpark, resolve), not by later work.
        attention_required=before.attention_required or doubt is not None,
    )
    payment = receipt(after)
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
        event=messages.event(domain.event_type(status), payment, at, merchant=claim.merchant) if moved else None,
        notify=wake_up(payment),
        **fields,
    )
    return Settlement(claim, payment, finish, doubt, domain.follow_up(kind, verdict), fields)


def final(
    claim: Claim,
    verdict: Verdict,
    outcome: domain.BankOutcome,
    bank_ms: int,
    *,
    unknown_before: int,
    lost: Sequence[Mapping[str, Any]],
) -> Settlement:
    """A final answer to record, with the doubt it leaves (doubt_of)."""
    doubt = doubt_of(claim, outcome, unknown_before=unknown_before, lost=lost)
    return settlement(claim, verdict, outcome, bank_ms, doubt)


def own_work(claim: Claim, refusal: domain.BankOutcome, bank_ms: int) -> Settlement:
    """An "already done" proven our own earlier attempt's work (proves_own_work), to record as a
    success whose bank reference we were never given."""
    done = domain.BankOutcome("ok", http_status=refusal.http_status)
    return settlement(claim, Verdict.SUCCEEDED, done, bank_ms, domain.unnamed_work(claim.kind))


async def record_many(pool: asyncpg.Pool, settlements: Sequence[Settlement]) -> list[dict | None]:
    """Settlements that each record `alone`, in one statement: each one's payment, or None when
    its lease is no longer its claim's."""
    recorded = await store.finish_operations(pool, finishes=[s.finish for s in settlements])
    return [s.payment if (s.claim.operation_id, s.claim.owner) in recorded else None for s in settlements]


async def record_with_doubt_or_follow_up(pool: asyncpg.Pool, settled: Settlement) -> dict | None:
    """A settlement that does not record `alone`: one transaction with the doubt's flag and
    finding, and the follow-up operation."""
    claim, doubt, payment = settled.claim, settled.doubt, settled.payment
    at, merchant = settled.finish.at, claim.merchant
    async with pool.acquire() as conn, conn.transaction():
        if not await store.finish_operations(conn, finishes=[settled.finish]):
            return None
        if doubt is not None:
            await store.flag_doubt(
                conn,
                payment_id=claim.payment.id,
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
            await operations.enqueue(conn, claim.payment.id, settled.follow_up, at)
    return payment


# NOTIFY payloads are limited to 8000 bytes; a payment too large to send is re-read.
_WAKE_UP_LIMIT = 7900


def wake_up(payment: dict) -> str:
    """The long polls' wake-up for this payment: its id (`pay_` and hex), a space, then the
    payment as GET shows it (just the id when that does not fit a NOTIFY payload)."""
    text = f"{payment['id']} {orjson.dumps(payment).decode()}"
    return text if len(text) <= _WAKE_UP_LIMIT else payment["id"]


async def park(pool: asyncpg.Pool, operation_id: str, error: dict) -> dict | None:
    """Retries are exhausted: flag the payment for ops and announce it. None if already settled."""
    async with pool.acquire() as conn, conn.transaction():
        row = await store.lock_operation(conn, operation_id=operation_id)
        if row is None:
            return None
        at = now()
        payment = receipt(replace(Payment.from_row(row), attention_required=True, last_error=error, updated_at=at))
        event = messages.event(domain.ATTENTION_EVENT, payment, at, merchant=row["merchant"])
        await store.park_operation(conn, operation_id=operation_id, at=at, error=error, event=event)
    return payment


async def unpark(pool: asyncpg.Pool, operation_id: str, *, forced: bool) -> bool:
    """Back from the dead-letter queue (forced: an authorization past the key horizon is sent
    anyway): False when the operation has meanwhile finished."""
    return await store.unpark_operation(pool, operation_id=operation_id, forced=forced)
