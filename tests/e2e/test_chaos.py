"""The chaos run: a bank failing 20% of requests and losing 10% of its answers.

500 orders go through random full lifecycles (authorize, then capture, capture and
refund, void or nothing; some cards are declined), 40 at a time, all through the
HTTP API. Afterwards every payment must be in the status its flow asked for, and
the bank's ledger must hold exactly the work those statuses need: one hold per
authorized payment, one capture per captured, one void per voided, one refund per
refunded; nothing twice, nothing missing. Every outbox row is published and every
settled status has its event.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.flows import audit, plans, run_flows, wait_for_events

pytestmark = pytest.mark.timeout(300)


async def test_500_random_lifecycles_against_a_failing_lossy_bank(e2e, capsys):
    await e2e.bank.reset()  # an empty ledger: every entry must be explained by this run
    await e2e.bank.chaos(min_latency_ms=0, max_latency_ms=20, failure_rate=0.2, response_loss_rate=0.1)
    client = e2e.client(patience=120)
    cards = await e2e.extra_cards(20)
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    try:
        flows = await run_flows(client, plans(500, cards, seed=20240601), run_id, concurrency=40)
    finally:
        await e2e.bank.chaos(failure_rate=0, response_loss_rate=0)
    backlog = await e2e.quiescent(timeout=60)
    await wait_for_events(e2e.events, client, flows)
    ledger = await e2e.bank.ledger()
    result = await audit(client, flows, ledger, e2e.events, backlog.get("unsent", -1))
    wall = time.monotonic() - started
    stats = ledger["stats"]
    with capsys.disabled():
        print(
            f"\n[chaos] payments={result.payments} statuses={dict(result.statuses)} "
            f"bank_requests={stats['api_requests']} injected_failures={stats['injected_failures']} "
            f"lost_responses={stats['lost_responses']} replays={stats['replays']} "
            f"events={len(e2e.events.events)} deliveries={e2e.events.deliveries} "
            f"backlog={backlog} wall={wall:.1f}s audit={result.report()}"
        )
    assert not result.failures, result.report()
    assert stats["injected_failures"] > 0 and stats["lost_responses"] > 0  # the chaos did happen
