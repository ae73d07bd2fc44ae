"""The payment phases one request at a time, for tests that play the API or the worker against
a real database: each request goes as a batch of one, where the processes send theirs through
the batchers they compose (gateway/api/routes.py, worker/consumer.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TypeVar

import asyncpg

from gateway import domain, store
from gateway.cards import CardVault
from gateway.domain import Action, BankOutcome, Verdict
from gateway.payments import intake, settlement

T = TypeVar("T")


async def _alone(batch: Awaitable[Sequence[T]]) -> T:
    (result,) = await batch
    return result


async def authorize(pool: asyncpg.Pool, vault: CardVault, req: intake.IdempotentRequest, **request) -> intake.Response:
    """intake.authorization recorded by submit_many, answered as the API answers it."""
    submission = intake.authorization(vault, req, **request)
    return await intake.answer_authorization(pool, req, submission, _alone(intake.submit_many(pool, [submission])))


async def request_action(
    pool: asyncpg.Pool, req: intake.IdempotentRequest, payment_id: str, action: Action, amount: int | None
) -> intake.Response:
    """A capture, void or refund recorded by request_actions, answered as the API answers it."""
    asked = intake.action_request(req, payment_id, action, amount)
    return await intake.answer_action(pool, req, await _alone(intake.request_actions(pool, [asked])))


async def claim(
    pool: asyncpg.Pool, operation_id: str, owner: str, lease_seconds: float
) -> settlement.Claim | settlement.OperationState:
    """The lease, as the worker takes it (claim_many), or why not."""
    claimed = await _alone(settlement.claim_many(pool, [store.ClaimRequest(operation_id, owner, lease_seconds)]))
    return claimed if claimed is not None else await settlement.why_not_claimed(pool, operation_id)


async def record_outcome(
    pool: asyncpg.Pool,
    claim: settlement.Claim,
    verdict: Verdict,
    outcome: BankOutcome,
    bank_ms: int,
    doubt: domain.Doubt | None = None,
) -> dict | None:
    """The bank's final answer recorded as the worker records it: the payment, or None when the
    lease is no longer the claim's."""
    settled = settlement.settlement(claim, verdict, outcome, bank_ms, doubt)
    if settled.alone:
        return await _alone(settlement.record_many(pool, [settled]))
    return await settlement.record_with_doubt_or_follow_up(pool, settled)
