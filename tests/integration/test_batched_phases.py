"""The phases the API and the worker send together (gateway/batching.py), on real PostgreSQL:
what each request gets when it shares a statement with others, conflicts included."""

from __future__ import annotations

import asyncio
import functools
import uuid

import pytest
from opentelemetry.trace import SpanKind

from gateway import domain, store, tracing
from gateway.batching import Batcher
from gateway.cards import CardVault
from gateway.domain import Action, BankOutcome, InvalidTransition, Verdict
from gateway.payments import intake, settlement
from tests.integration.conftest import CARD_NUMBER, CVV, authorized, pending_operation
from tests.support import factories, phases


def _request(key: str, order_id: str) -> tuple[intake.IdempotentRequest, dict]:
    fields = {"order_id": order_id, "customer_id": "cus_batch", "amount": 1200}
    body = f'{{"order_id":"{order_id}","key":"{key}"}}'.encode()  # a body of its own per order
    return factories.request("/v1/payments", body, key=key), fields


async def _sent_together(run_batch, callers) -> tuple[list[object], list[int]]:
    """Each caller (given the Batcher's submit) started at once, through one Batcher held back
    until all have asked, so that their requests go in one batch: the results, in order, and
    the size of every batch sent (the first is the blocker's)."""
    gate, sizes = asyncio.Event(), []

    async def held(batch):
        sizes.append(len(batch))
        await gate.wait()
        if batch == [None]:  # the blocker's
            return [None]
        return await run_batch(batch)

    batcher = Batcher(held, max_in_flight=1)
    blocker = asyncio.create_task(batcher.submit(None))  # occupies the one slot until the gate opens
    tasks = [asyncio.create_task(call(batcher.submit)) for call in callers]
    await asyncio.sleep(0.05)
    gate.set()
    await blocker
    return await asyncio.gather(*tasks, return_exceptions=True), sizes


async def _authorize_together(pool, card_keys, asked: list[tuple[str, str]]) -> list[object]:
    """An authorization for each (key, order_id) at once: they go in one statement (submit_many)."""
    vault, card = CardVault(card_keys), intake.CardInput(CARD_NUMBER, CVV, 12, 2030)

    def caller(key: str, order_id: str):
        req, fields = _request(key, order_id)
        submission = intake.authorization(vault, req, card=card, **fields)
        return lambda submit: intake.answer_authorization(pool, req, submission, submit(submission))

    results, sizes = await _sent_together(
        lambda batch: intake.submit_many(pool, batch), [caller(key, order_id) for key, order_id in asked]
    )
    assert sizes[:2] == [1, len(asked)]  # the blocker's, then every request's together
    return results


async def _payments_of(pool, order_ids: list[str]) -> int:
    return await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = ANY($1::text[])", order_ids)


async def test_authorizations_sent_together_are_each_recorded_once(pool, api_settings):
    asked = [(uuid.uuid4().hex, f"ord_{uuid.uuid4().hex[:10]}") for _ in range(5)]
    results = await _authorize_together(pool, api_settings.card_keyring, asked)
    assert all(isinstance(r, intake.Response) and r.status == 202 and not r.replayed for r in results), results
    orders = [o for _, o in asked]
    assert await _payments_of(pool, orders) == 5
    recorded = await pool.fetchrow(
        "SELECT count(DISTINCT o.id) AS operations, count(DISTINCT v.payment_id) AS cards,"
        " count(DISTINCT k.key) AS keys"
        " FROM payments p JOIN operations o ON o.payment_id = p.id JOIN card_vault v ON v.payment_id = p.id"
        " JOIN idempotency_keys k ON k.merchant = p.merchant AND k.location = '/v1/payments/' || p.id"
        " WHERE p.order_id = ANY($1::text[])",
        orders,
    )
    assert dict(recorded) == {"operations": 5, "cards": 5, "keys": 5}


async def test_a_conflict_in_a_batch_is_the_conflicting_request_s_alone(pool, api_settings):
    same_order = f"ord_{uuid.uuid4().hex[:10]}"
    others = [(uuid.uuid4().hex, f"ord_{uuid.uuid4().hex[:10]}") for _ in range(3)]
    asked = [(uuid.uuid4().hex, same_order), *others, (uuid.uuid4().hex, same_order)]
    results = await _authorize_together(pool, api_settings.card_keyring, asked)
    accepted = [r for r in results if isinstance(r, intake.Response) and r.status == 202]
    refused = [r for r in results if isinstance(r, intake.OrderAlreadyPaid)]
    assert len(accepted) == 4 and len(refused) == 1, results
    assert await _payments_of(pool, [same_order]) == 1
    assert await _payments_of(pool, [o for _, o in others]) == 3


async def test_one_key_twice_in_a_batch_makes_one_payment(pool, api_settings):
    key, order = uuid.uuid4().hex, f"ord_{uuid.uuid4().hex[:10]}"
    results = await _authorize_together(pool, api_settings.card_keyring, [(key, order), (key, order)])
    assert await _payments_of(pool, [order]) == 1
    answered = [r for r in results if isinstance(r, intake.Response)]
    busy = [r for r in results if isinstance(r, intake.RequestInProgress)]
    assert len(answered) + len(busy) == 2 and answered, results
    assert len({r.location for r in answered}) == 1  # a replay, if any, names the same payment


def _action(payment_id: str, action: Action, *, key: str | None = None, amount: int | None = None) -> tuple:
    body = b"" if amount is None else f'{{"amount":{amount}}}'.encode()
    path = f"/v1/payments/{payment_id}/{action.value}"
    return (
        factories.request(path, body, key=key),
        payment_id,
        action,
        amount,
    )


async def _act_together(pool, asked: list[tuple], traceparents: list[str] | None = None) -> list[object]:
    """A capture, void or refund for each (request, payment id, action, amount) at once: they go
    in one transaction, which must not fail (a failed batch is sent again one request at a time).
    With `traceparents`, each request runs in the trace its traceparent names (as each API request
    runs in the trace it started)."""

    async def act(a: tuple, traceparent: str | None, submit):
        if traceparent is None:
            return await intake.answer_action(pool, a[0], await submit(intake.action_request(*a)))
        with tracing.continued({"traceparent": traceparent}, "POST capture", SpanKind.SERVER):
            return await intake.answer_action(pool, a[0], await submit(intake.action_request(*a)))

    traces = traceparents or [None] * len(asked)
    results, sizes = await _sent_together(
        lambda batch: intake.request_actions(pool, batch),
        [functools.partial(act, a, t) for a, t in zip(asked, traces, strict=True)],
    )
    assert sizes == [1, len(asked)]  # the blocker's, then every request's together, not again alone
    return results


async def _started(pool, payment_id: str) -> dict:
    return dict(
        await pool.fetchrow(
            "SELECT p.status,"
            " (SELECT count(*) FROM operations o WHERE o.payment_id = p.id AND o.kind <> 'authorize') AS operations,"
            " (SELECT count(*) FROM payment_history h WHERE h.payment_id = p.id) AS history,"
            " (SELECT count(*) FROM idempotency_keys k WHERE k.merchant = p.merchant"
            "   AND k.path LIKE '/v1/payments/' || p.id || '/%') AS keys"
            " FROM payments p WHERE p.id = $1",
            payment_id,
        )
    )


async def test_captures_voids_and_refunds_sent_together_each_start_their_own_operation(api, pool):
    to_capture = [(await authorized(api, pool))["id"] for _ in range(3)]
    to_void = (await authorized(api, pool))["id"]
    results = await _act_together(
        pool, [*(_action(pid, Action.CAPTURE) for pid in to_capture), _action(to_void, Action.VOID)]
    )
    assert [r.status for r in results] == [202] * 4, results
    for pid in to_capture:
        assert await _started(pool, pid) == {"status": "capturing", "operations": 1, "history": 3, "keys": 1}
    assert await _started(pool, to_void) == {"status": "voiding", "operations": 1, "history": 3, "keys": 1}
    commands = await pool.fetchval(
        "SELECT count(*) FROM outbox o"
        " JOIN operations op ON convert_from(o.body, 'UTF8')::jsonb->>'operation_id' = op.id"
        " WHERE op.payment_id = ANY($1::text[]) AND op.kind <> 'authorize'",
        [*to_capture, to_void],
    )
    assert commands == 4


async def test_each_command_of_a_batch_carries_its_own_request_s_trace(api, pool):
    pids = [(await authorized(api, pool))["id"] for _ in range(3)]
    trace_ids = [uuid.uuid4().hex for _ in pids]
    traceparents = [f"00-{t}-{uuid.uuid4().hex[:16]}-01" for t in trace_ids]
    results = await _act_together(pool, [_action(pid, Action.CAPTURE) for pid in pids], traceparents)
    assert [r.status for r in results] == [202] * 3, results
    rows = await pool.fetch(
        "SELECT op.payment_id, o.headers->>'traceparent' AS traceparent FROM outbox o"
        " JOIN operations op ON convert_from(o.body, 'UTF8')::jsonb->>'operation_id' = op.id"
        " WHERE op.payment_id = ANY($1::text[]) AND op.kind = 'capture'",
        pids,
    )
    carried = {r["payment_id"]: r["traceparent"].split("-")[1] for r in rows}
    assert carried == dict(zip(pids, trace_ids, strict=True))


async def test_each_request_of_a_batch_is_decided_as_if_after_the_ones_before_it(api, pool):
    first, second, third, fourth = [(await authorized(api, pool))["id"] for _ in range(4)]
    replayed_key = uuid.uuid4().hex
    earlier = await phases.request_action(pool, *_action(fourth, Action.VOID, key=replayed_key))
    twin_key = uuid.uuid4().hex
    results = await _act_together(
        pool,
        [
            _action(first, Action.CAPTURE),
            _action(first, Action.VOID),  # another key, the same payment: it is capturing by now
            _action(second, Action.CAPTURE, amount=1),  # not the full amount
            _action("pay_" + uuid.uuid4().hex, Action.REFUND),  # no such payment
            _action(third, Action.CAPTURE, key=twin_key),
            _action(third, Action.CAPTURE, key=twin_key),  # the same key again, while the first holds it
            _action(fourth, Action.VOID, key=replayed_key),  # answered before: the same answer
        ],
    )
    captured, refused, mismatch, missing, twin, busy, replay = results
    assert captured.status == 202 and twin.status == 202
    assert isinstance(refused, InvalidTransition) and refused.status.value == "capturing"
    assert isinstance(mismatch, intake.AmountMismatch) and mismatch.got == 1
    assert isinstance(missing, intake.PaymentNotFound)
    assert isinstance(busy, intake.RequestInProgress)
    assert replay.replayed and replay.body == earlier.body
    assert await _started(pool, first) == {"status": "capturing", "operations": 1, "history": 3, "keys": 1}
    assert await _started(pool, second) == {"status": "authorized", "operations": 0, "history": 2, "keys": 0}
    assert await _started(pool, third) == {"status": "capturing", "operations": 1, "history": 3, "keys": 1}
    assert await _started(pool, fourth) == {"status": "voiding", "operations": 1, "history": 3, "keys": 1}


@pytest.fixture
async def two_pending(api, pool) -> list[str]:
    ops = []
    for _ in range(2):
        payment = await api.authorize()
        ops.append(await pending_operation(pool, payment["id"]))
    return ops


async def test_an_operation_asked_for_twice_in_one_claim_goes_to_one_owner(pool, two_pending):
    first, second = two_pending
    claims = await settlement.claim_many(
        pool,
        [
            store.ClaimRequest(first, "w/a", 30),
            store.ClaimRequest(first, "w/b", 30),
            store.ClaimRequest(second, "w/c", 30),
        ],
    )
    won = [c for c in claims[:2] if c is not None]
    assert len(won) == 1 and won[0].operation_id == first and won[0].attempts == 1
    assert claims[2] is not None and claims[2].owner == "w/c"
    loser = "w/b" if won[0].owner == "w/a" else "w/a"
    state = await phases.claim(pool, first, loser, 30)
    assert isinstance(state, settlement.OperationState) and state.lease_left > 0  # leased elsewhere


async def test_outcomes_recorded_together_each_settle_their_own_payment(pool, two_pending):
    first, second = two_pending
    claims = await settlement.claim_many(
        pool, [store.ClaimRequest(first, "w/1", 30), store.ClaimRequest(second, "w/2", 30)]
    )
    approved, declined = claims
    assert approved is not None and declined is not None
    body = {"authorization_id": f"auth_{uuid.uuid4().hex}", "expires_at": "2030-01-08T00:00:00Z"}
    settlements = [
        settlement.settlement(approved, Verdict.SUCCEEDED, BankOutcome("ok", 200, body=body), 5),
        settlement.settlement(declined, Verdict.REFUSED, BankOutcome("error", 402, code="card_declined"), 5),
    ]
    stale = settlement.settlement(
        settlement.Claim(**{**approved.__dict__, "owner": "w/gone"}),
        Verdict.SUCCEEDED,
        BankOutcome("ok", 200, body=body),
        5,
    )
    recorded = await settlement.record_many(pool, [*settlements, stale])
    assert recorded[0] is not None and recorded[0]["status"] == "authorized"
    assert recorded[1] is not None and recorded[1]["status"] == "declined"
    assert recorded[2] is None  # its lease was never its owner's
    rows = await pool.fetch(
        "SELECT p.status, p.authorization_id,"
        " (SELECT count(*) FROM card_vault v WHERE v.payment_id = p.id) AS cards,"
        " (SELECT count(*) FROM payment_history h WHERE h.payment_id = p.id) AS history"
        " FROM operations o JOIN payments p ON p.id = o.payment_id"
        " WHERE o.id = ANY($1::text[]) ORDER BY o.id = $2 DESC",
        [first, second],
        first,
    )
    assert [r["status"] for r in rows] == ["authorized", "declined"]
    assert rows[0]["authorization_id"] == body["authorization_id"] and rows[1]["authorization_id"] is None
    assert [r["cards"] for r in rows] == [0, 0] and [r["history"] for r in rows] == [2, 2]


async def test_attempts_are_reported_by_their_holder_or_by_the_claim_after_a_holder_that_stopped(pool, two_pending):
    op, other = two_pending
    first = await phases.claim(pool, op, "w/1", 30)
    assert isinstance(first, settlement.Claim) and (first.attempts, first.unknown_outcomes, first.lost_answers) == (
        1,
        0,
        (),
    )
    timeout = domain.lost_answer(1, "2030-01-01T00:00:00Z", "w/1", domain.error_for(BankOutcome("timeout")))
    noted = await settlement.note_many(
        pool,
        [
            store.AttemptNote(op, "w/1", store.AttemptReport(0, [timeout])),
            store.AttemptNote(other, "w/nobody", store.AttemptReport(1, [])),  # holds no lease: nothing noted
        ],
    )
    assert noted == [True, False]
    renewed = await phases.claim(pool, op, "w/1", 0.01)  # the holder's next try: nothing unreported
    assert isinstance(renewed, settlement.Claim) and renewed.attempts == 2
    assert renewed.unknown_outcomes == 1 and renewed.lost_answers == [timeout]

    await asyncio.sleep(0.05)  # w/1 died during its second try, unreported; its lease runs out
    taken = await phases.claim(pool, op, "w/2", 30)
    assert isinstance(taken, settlement.Claim) and (taken.attempts, taken.unknown_outcomes) == (3, 2)
    stopped = taken.lost_answers[-1]
    assert (stopped["attempt"], stopped["worker"], stopped["code"]) == (2, "w/1", domain.WORKER_STOPPED)
    assert stopped["at"] is not None
    await settlement.release(pool, op, "w/2", {"code": "bank_internal_error"}, 5, store.AttemptReport(1, []))
    row = await pool.fetchrow(
        "SELECT attempts, clean_attempts, lost_answers, lease_owner FROM operations WHERE id = $1", op
    )
    assert (row["attempts"], row["clean_attempts"], len(row["lost_answers"]), row["lease_owner"]) == (3, 1, 2, None)
    last = await phases.claim(pool, op, "w/3", 30)  # everything was reported: no entry added
    assert isinstance(last, settlement.Claim) and last.unknown_outcomes == 2 and len(last.lost_answers) == 2
    untouched = await pool.fetchrow("SELECT clean_attempts, lost_answers FROM operations WHERE id = $1", other)
    assert (untouched["clean_attempts"], untouched["lost_answers"]) == (0, None)
