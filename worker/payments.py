"""ports.Payments on the worker's pool: what worker/handling.py asks of gateway.payments.settlement,
the next module a capture's reader opens. The claims, notes and outcomes of concurrent
handlings go to the database together (gateway.batching); an outcome the database refuses to
store becomes ports.CannotRecord, for the handling to retry or park."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg

from gateway import domain, redact, store
from gateway.batching import Batcher
from gateway.domain import BankOutcome, Verdict
from gateway.payments import settlement
from gateway.payments.settlement import Claim, OperationState
from worker.metrics import WorkerMetrics
from worker.ports import CannotRecord

# The database refused what we asked it to store (not: the database is away, which the
# handling's pause deals with): the same answer stored again fails the same way.
_UNRECORDABLE = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    KeyError,
    TypeError,
)


class PoolPayments:
    """ports.Payments: the worker's phases of gateway.payments.settlement on one pool."""

    def __init__(self, pool: asyncpg.Pool, metrics: WorkerMetrics):
        self._pool = pool
        self._metrics = metrics
        self.claims: Batcher[store.ClaimRequest, Claim | None] = Batcher(functools.partial(settlement.claim_many, pool))
        self.outcomes: Batcher[settlement.Settlement, dict | None] = Batcher(
            functools.partial(settlement.record_many, pool)
        )
        self.notes: Batcher[store.AttemptNote, bool] = Batcher(functools.partial(settlement.note_many, pool))

    async def claim(self, operation_id: str, owner: str, lease_seconds: float) -> Claim | OperationState:
        claimed = await self.claims.submit(store.ClaimRequest(operation_id, owner, lease_seconds))
        return claimed if claimed is not None else await settlement.why_not_claimed(self._pool, operation_id)

    async def release(
        self,
        operation_id: str,
        owner: str,
        error: dict | None,
        bank_ms: int,
        report: store.AttemptReport,
        *,
        rung_taken: bool = False,
    ) -> None:
        await settlement.release(self._pool, operation_id, owner, error, bank_ms, report, rung_taken=rung_taken)

    async def note(self, operation_id: str, owner: str, report: store.AttemptReport) -> None:
        await self.notes.submit(store.AttemptNote(operation_id, owner, report))

    async def record_outcome(
        self,
        claim: Claim,
        verdict: Verdict,
        outcome: BankOutcome,
        bank_ms: int,
        *,
        unknown_before: int,
        lost: Sequence[Mapping[str, Any]],
    ) -> domain.Doubt | None:
        return await self._record(
            lambda: settlement.final(claim, verdict, outcome, bank_ms, unknown_before=unknown_before, lost=lost)
        )

    async def proves_own_work(self, claim: Claim, refusal: BankOutcome, *, unknown_before: int) -> bool:
        return await settlement.proves_own_work(self._pool, claim, refusal, unknown_before=unknown_before)

    async def record_own_work(self, claim: Claim, refusal: BankOutcome, bank_ms: int) -> domain.Doubt | None:
        return await self._record(lambda: settlement.own_work(claim, refusal, bank_ms))

    async def _record(self, settle: Callable[[], settlement.Settlement]) -> domain.Doubt | None:
        """The settlement `settle` builds, stored: alone, with the outcomes of other handlings."""
        try:
            settled = settle()
            if settled.alone:
                payment = await self.outcomes.submit(settled)
            else:
                payment = await settlement.record_with_doubt_or_follow_up(self._pool, settled)
        except _UNRECORDABLE as exc:
            raise CannotRecord(f"{type(exc).__name__}: {redact.clean(str(exc), 200)}") from exc
        self._metrics.outcome_recorded(payment)
        return settled.doubt

    async def park(self, operation_id: str, error: dict) -> dict | None:
        return await settlement.park(self._pool, operation_id, error)
