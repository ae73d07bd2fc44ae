"""The worker's phases: an operation's bank attempts and the outcome recorded.

A handling claims the operation under a lease before each bank attempt
(claim_operations), reports attempts that changed nothing or lost their answer
(release_lease, note_attempts), and records the final outcome (finish_operations), a
doubt for a human (flag_doubt) or the operation parked for ops (park_operation);
insert_operation starts the bank work an outcome makes necessary. The payment phases
(gateway/payments) call them. SQL in gateway/sql/settlement.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, NamedTuple

import asyncpg
import orjson

from gateway.domain import OperationKind, Status
from gateway.messages import OutboxMessage
from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load
from gateway.store.outbox import command_columns, event_arrays, event_columns

_sql = load(SQL_DIR / "settlement.sql")


class ClaimRequest(NamedTuple):
    operation_id: str
    owner: str  # one handling of one message
    lease_seconds: float


async def claim_operations(db: Executor, *, claims: Sequence[ClaimRequest]) -> list[asyncpg.Record]:
    """The operations claimed, of those asked for, with what their bank calls need; `owner`
    names the request each row is for. A request without a row cannot be claimed now."""
    return await all_rows(
        _sql.claim_operations,
        db,
        operation_ids=[c.operation_id for c in claims],
        owners=[c.owner for c in claims],
        lease_seconds=[c.lease_seconds for c in claims],
    )


async def operation_state(db: Executor, *, operation_id: str) -> asyncpg.Record | None:
    return await _sql.operation_state(db, operation_id=operation_id)


class AttemptReport(NamedTuple):
    """What a lease holder learnt of its attempts not reported yet: how many are known to have
    done nothing at the bank, and what is known of each of the others (operations.lost_answers)."""

    clean_attempts: int = 0
    lost_answers: Sequence[dict] = ()


async def release_lease(
    db: Executor,
    *,
    operation_id: str,
    owner: str,
    error: dict | None,
    bank_ms: int,
    report: AttemptReport,
    rung_taken: bool = False,
) -> None:
    """Give the lease back, with the report of the holder's attempts (and a rung counted)."""
    await _sql.release_lease(
        db,
        operation_id=operation_id,
        owner=owner,
        error=error,
        bank_ms=bank_ms,
        rung_taken=rung_taken,
        clean_attempts=report.clean_attempts,
        lost_answers=list(report.lost_answers),
    )


class AttemptNote(NamedTuple):
    operation_id: str
    owner: str  # the lease holder reporting
    report: AttemptReport


async def note_attempts(db: Executor, *, notes: Sequence[AttemptNote]) -> set[str]:
    """Record each holder's report, keeping the leases; the operations noted (one whose lease is
    no longer its owner's is not)."""
    rows = await all_rows(
        _sql.note_attempts,
        db,
        operation_ids=[n.operation_id for n in notes],
        owners=[n.owner for n in notes],
        clean_attempts=[n.report.clean_attempts for n in notes],
        # JSON text: a list of lists would be read as one two-dimensional array
        lost_answers=[orjson.dumps(list(n.report.lost_answers)).decode() for n in notes],
    )
    return {row["id"] for row in rows}


async def operation_kinds_tried(db: Executor, *, payment_id: str, operation_id: str) -> frozenset[OperationKind]:
    """The kinds of the payment's other operations that were ever sent to the bank."""
    rows = await all_rows(_sql.operation_kinds_tried, db, payment_id=payment_id, operation_id=operation_id)
    return frozenset(OperationKind(r["kind"]) for r in rows)


async def flag_doubt(
    db: Connection,
    *,
    payment_id: str,
    at: datetime,
    error: dict,
    event: OutboxMessage,
    run_id: str,
    finding_kind: str | None,
    finding_detail: dict | None,
) -> None:
    """Flag a payment whose recorded outcome a human must check; the finding when one is named."""
    await _sql.flag_doubt(
        db,
        payment_id=payment_id,
        at=at,
        error=error,
        run_id=run_id,
        finding_kind=finding_kind,
        finding_detail=finding_detail,
        **event_columns(event),
    )


async def lock_operation(db: Connection, *, operation_id: str) -> asyncpg.Record | None:
    """The pending operation (operation_id, kind, bank_key) with its payment row, both locked."""
    return await _sql.lock_operation(db, operation_id=operation_id)


class Finish(NamedTuple):
    """One final outcome for finish_operations: the operation settled and its payment moved to
    `payment_status` while `owner` holds the lease. A bank id left None keeps the payment's
    value; `status_moved` writes the history row, `drop_card` deletes the sealed card,
    `notify` is the payload for the long polls."""

    operation_id: str
    owner: str
    operation_status: Literal["succeeded", "failed"]
    at: datetime
    error: dict | None
    bank_response: dict | None
    bank_ms: int
    payment_status: Status
    cause: str
    status_moved: bool
    drop_card: bool
    event: OutboxMessage | None
    notify: str
    authorization_id: str | None = None
    authorization_expires_at: datetime | None = None
    capture_id: str | None = None
    void_id: str | None = None
    refund_id: str | None = None


async def finish_operations(db: Executor, *, finishes: Sequence[Finish]) -> set[tuple[str, str]]:
    """Record every outcome in one statement; the (operation_id, owner) pairs recorded (one whose
    lease is no longer its owner's is not: another handling records it)."""
    rows = await all_rows(
        _sql.finish_operations,
        db,
        operation_ids=[f.operation_id for f in finishes],
        owners=[f.owner for f in finishes],
        operation_statuses=[f.operation_status for f in finishes],
        ats=[f.at for f in finishes],
        errors=[f.error for f in finishes],
        bank_responses=[f.bank_response for f in finishes],
        bank_ms=[f.bank_ms for f in finishes],
        payment_statuses=[f.payment_status.value for f in finishes],
        authorization_ids=[f.authorization_id for f in finishes],
        authorization_expires_ats=[f.authorization_expires_at for f in finishes],
        capture_ids=[f.capture_id for f in finishes],
        void_ids=[f.void_id for f in finishes],
        refund_ids=[f.refund_id for f in finishes],
        causes=[f.cause for f in finishes],
        statuses_moved=[f.status_moved for f in finishes],
        drop_cards=[f.drop_card for f in finishes],
        **event_arrays([f.event for f in finishes]),
        notifies=[f.notify for f in finishes],
    )
    return {(row["operation_id"], row["owner"]) for row in rows}


async def park_operation(db: Connection, *, operation_id: str, at: datetime, error: dict, event: OutboxMessage) -> None:
    await _sql.park_operation(db, operation_id=operation_id, at=at, error=error, **event_columns(event))


async def unpark_operation(db: Executor, *, operation_id: str, forced: bool) -> bool:
    """False when the operation is no longer pending."""
    return await _sql.unpark_operation(db, operation_id=operation_id, forced=forced) is not None


async def insert_operation(
    db: Connection,
    *,
    operation_id: str,
    payment_id: str,
    kind: OperationKind,
    bank_key: str,
    at: datetime,
    command: OutboxMessage,
) -> None:
    """A new operation with its command: bank work an outcome makes necessary (a follow-up)."""
    await _sql.insert_operation(
        db,
        operation_id=operation_id,
        payment_id=payment_id,
        kind=kind.value,
        bank_key=bank_key,
        at=at,
        **command_columns(command),
    )
