"""The bank goes away for a while: nothing parked, everything settled soon after it is back.

Issue 10's target is a 5-minute outage while 2000 authorizations arrive at 100/s, all
authorized within 60 s of the bank's return and none parked. Here the same shape is
shortened: the mock bank is down (connection reset, /health too) for 25 s while a few
hundred authorizations arrive at a steady rate. The e2e stack's ladder (1,2,4 s after
three quick tries) would park every one of them within about 8 s if the worker kept
spending attempts and rungs on a bank that is down; its circuit breaker holds them
instead, probes /health, and lets them through as soon as the bank answers.

The full figure is a `long` test (make test-long), on a stack of its own with the
default settings. Also here: the bank's usual 5% of injected 500s, against a real
mock bank, never opens the breaker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import pytest

from harness.procs import ScriptProcess, free_port
from tests.e2e.stack import GATEWAY_ENV, Stack
from worker.bank import BankClient
from worker.bank_gate import policy
from worker.breaker import CircuitBreaker, judge
from worker.settings import RelaySettings, WorkerSettings

pytestmark = pytest.mark.timeout(240)

RATE = 12  # authorizations per second
OUTAGE = 25.0  # seconds the bank is down
BEFORE = 2.0  # seconds of arrivals before it goes down
SETTLED_WITHIN = 30.0  # seconds after the bank is back (the issue's target: 60 s for 2000)


async def test_usual_failure_rate_of_a_real_mock_bank_never_opens_the_breaker():
    opened: list[str] = []
    breaker = CircuitBreaker(policy(WorkerSettings.parse({})), on_change=lambda old, new, why: opened.append(why))
    port = free_port()
    env = {"FAILURE_RATE": "0.05", "MIN_LATENCY_MS": "0", "MAX_LATENCY_MS": "5", "LOG_LEVEL": "warning"}
    failures = 0
    async with ScriptProcess("mockbank", "--port", str(port), env=env) as bank_process:
        await bank_process.wait_http(f"http://127.0.0.1:{port}/health")
        async with BankClient(f"http://127.0.0.1:{port}", timeout=5) as bank:
            numbers = itertools.count()

            async def operation() -> None:
                nonlocal failures
                source = f"op{next(numbers)}"
                for _ in range(3):  # an operation retries its failures, as the worker does
                    permit = breaker.acquire(source)
                    assert permit is not None, opened
                    outcome = await bank.get_authorization(f"auth_{uuid.uuid4()}")  # 404, or an injected 500
                    breaker.record(permit, judge(outcome))
                    if judge(outcome) is None:
                        return
                    failures += 1

            for _ in range(60):  # 3000 operations, 50 at a time
                await asyncio.gather(*(operation() for _ in range(50)))
    assert opened == [] and breaker.times_opened == 0
    assert 75 <= failures <= 250  # the 5% did happen (about 150 expected)


async def test_a_bank_outage_parks_nothing_and_all_settle_soon_after_it_is_back(e2e, capsys):
    await outage_run(e2e, capsys, rate=RATE, total=int((BEFORE + OUTAGE) * RATE), before=BEFORE, outage=OUTAGE)


@pytest.mark.long
@pytest.mark.timeout(1200)
async def test_issue_10_figure_five_minutes_down_2000_authorizations_at_100_per_second(server_urls, card_key, capsys):
    """The full figure, with the default settings of the worker and the mock bank (latency
    100-2000 ms, 5% of 500s): all authorized within 60 s of the bank's return, none parked."""
    defaults = {name: default for model in (WorkerSettings, RelaySettings) for name, default, _ in model.variables()}
    stack = Stack(
        server_urls,
        card_key,
        bank_env={"MIN_LATENCY_MS": "100", "MAX_LATENCY_MS": "2000", "FAILURE_RATE": "0.05"},
        gateway_env={name: defaults[name] for name in GATEWAY_ENV if name in defaults},
    )
    try:
        await stack.start()
        await outage_run(stack, capsys, rate=100, total=2000, before=0.0, outage=300.0, settle_within=60.0)
    finally:
        await stack.close()


async def outage_run(
    stack: Stack,
    capsys,
    *,
    rate: float,
    total: int,
    before: float,
    outage: float,
    settle_within: float = SETTLED_WITHIN,
) -> None:
    """`total` authorizations at `rate`/s; the bank goes down `before` s in and comes back
    `outage` s later. Every one is authorized once, none is parked, all within `settle_within`."""
    client = stack.client(patience=60)
    cards = await stack.extra_cards(20)
    run = uuid.uuid4().hex[:8]
    replies = []

    async def submit(index: int) -> None:
        reply = await client.authorize(
            order_id=f"ord_out_{run}_{index}", amount=100 + index, card=cards[index % len(cards)]
        )
        replies.append(reply)

    tasks: list[asyncio.Task] = []
    started = time.monotonic()
    went_down = None
    try:
        for index in range(total):
            if went_down is None and time.monotonic() - started >= before:
                await stack.bank.chaos(down=True)
                went_down = time.monotonic()
            tasks.append(asyncio.create_task(submit(index)))
            await asyncio.sleep(max(0.0, started + (index + 1) / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        assert went_down is not None
        # Everything accepted while the bank was down is still waiting, none of it parked.
        waiting = await stack.pool.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                      count(*) FILTER (WHERE attention_required) AS flagged
                 FROM payments WHERE order_id LIKE $1""",
            f"ord_out_{run}_%",
        )
        assert waiting["flagged"] == 0 and waiting["pending"] > 0
        await asyncio.sleep(max(0.0, went_down + outage - time.monotonic()))
    finally:
        await stack.bank.chaos(down=False)
        came_back = time.monotonic()

    assert all(r.status == 202 for r in replies), [r for r in replies if r.status != 202][:3]
    ids = [r.body["id"] for r in replies]
    deadline = came_back + settle_within + 30
    while True:
        left = await stack.pool.fetchval("SELECT count(*) FROM payments WHERE id = ANY($1) AND status = 'pending'", ids)
        if left == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    settled_after = time.monotonic() - came_back

    rows = await stack.pool.fetch(
        """SELECT p.id, p.status, p.attention_required, p.authorization_id, o.bank_key, o.attempts, o.parked
             FROM payments p JOIN operations o ON o.payment_id = p.id AND o.kind = 'authorize'
            WHERE p.id = ANY($1)""",
        ids,
    )
    ledger = await stack.bank.ledger()
    holds: dict[str, list[dict]] = {}
    for hold in ledger["authorizations"]:
        holds.setdefault(hold["idempotency_key"], []).append(hold)
    opened = stack.log_lines("circuit breaker open")
    with capsys.disabled():
        print(
            f"\n[outage] {total} authorizations at {rate:g}/s, bank down {outage:g} s; all settled "
            f"{settled_after:.1f} s after it came back (left pending: {left}); "
            f"attempts max {max(r['attempts'] for r in rows)}; breaker opened {len(opened)}x; "
            f"bank dropped {ledger['stats']['dropped_down']} requests; "
            f"flagged as a possible second hold {sum(r['attention_required'] for r in rows)}"
        )
    assert len(rows) == total
    assert [r["id"] for r in rows if r["status"] != "authorized"] == []
    assert [r["id"] for r in rows if r["parked"]] == []
    # The few tried before the breaker opened had their connection reset after the request was
    # in (the mock's "down"): an answer may have been lost, so their fresh approval may be a
    # second hold. Those, and only those, are flagged with a finding; the bank has one hold each.
    flagged = {r["id"] for r in rows if r["attention_required"]}
    found = await stack.pool.fetch(
        """SELECT payment_id FROM reconciliation_findings
            WHERE kind = 'possible_duplicate_hold' AND payment_id = ANY($1)""",
        ids,
    )
    assert flagged == {f["payment_id"] for f in found}
    # (a handful: the breaker opens after BREAKER_UNREACHABLE_OPERATIONS such operations in a row)
    assert len(flagged) <= 4 * WorkerSettings.parse({}).breaker_unreachable_operations, flagged
    assert settled_after <= settle_within
    for row in rows:  # exactly one hold each, the one the receipt names
        (hold,) = holds[row["bank_key"]]
        assert hold["authorization_id"] == row["authorization_id"]
    assert opened, "the worker never logged its breaker opening"
    assert await stack.events.wait_for(
        lambda: all(stack.events.types(pid)["payment.authorized"] == 1 for pid in ids), 60
    )
    assert {pid for pid in ids if stack.events.types(pid)["payment.attention_required"]} == flagged
