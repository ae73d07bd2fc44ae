"""Ops decisions: what an operator records on a payment after checking the bank. Settle a parked
operation by hand, resolve a flagged payment (filling missing bank ids), record one bank
reference, abandon an operation parked for long enough; and the sweeper's closing of a doubt
whose hold has lapsed. Each is one transaction that checks the payment as it is now (OpsRefused
when the decision no longer fits), writes a history row naming who and why, and announces a
status it moves to. gatewayctl (decisions.py) and the /ops console are front-ends over these.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from gateway import domain, messages, store
from gateway.domain import OperationKind, Payment, Status, Verdict
from gateway.payments import operations
from gateway.redact import clean
from gateway.timefmt import now
from gateway.views import receipt


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
        payment = receipt(
            Payment.from_row(row).entering(status, at, **filled, last_error=error, attention_required=attention)
        )
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
    resolved = Payment.from_row({**row, **references, "attention_required": flag, "updated_at": at})
    return OpsDecision(receipt(resolved), cause)


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
        payment = receipt(Payment.from_row(row).entering(plan.status, at, last_error=error, attention_required=False))
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
        follow_up = (
            await operations.enqueue(conn, payment_id, plan.follow_up, at) if plan.follow_up is not None else None
        )
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
