"""Webhooks end to end: 50 payment lifecycles through the real processes, delivered by
gateway-webhooks to a shop's receiver that refuses its first deliveries and is down for a
while. Every event arrives, each with a signature that verifies (the receiver's own check,
as docs/webhooks.md shows a shop), nothing is lost, and the events feed read from the start
lists the same events, in the order each payment went through them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict

import orjson
import pytest

from harness.procs import run_script
from tests.e2e.flows import plans, run_flows
from tests.e2e.stack import EVENT_STATUSES, MERCHANT, running_stack
from tests.support.webhook_receiver import Receiver, verify

pytestmark = pytest.mark.timeout(300)

REFUSED_FIRST = 10
# Retries in a fraction of a second instead of 10 s doubling to an hour.
WEBHOOK_ENV = {"WEBHOOK_RETRY_BASE_SECONDS": "0.2", "WEBHOOK_RETRY_MAX_SECONDS": "1", "WEBHOOK_POLL_SECONDS": "0.1"}


async def feed_from_start(client) -> list[dict]:
    events, after = [], None
    while True:
        params = {"limit": "100", **({"after": after} if after else {})}
        reply = await client.request("GET", "/v1/events", params=params)
        assert reply.status == 200, reply
        events += reply.body["data"]
        after = reply.body["next_after"]
        if not reply.body["has_more"]:
            return events


async def test_every_event_of_50_lifecycles_reaches_a_receiver_that_refuses_and_goes_down(server_urls, card_key):
    receiver = Receiver(lambda n, request: 503 if n < REFUSED_FIRST else 200)
    await receiver.start()
    async with running_stack(server_urls, card_key, gateway_env=WEBHOOK_ENV) as stack:
        registered = await asyncio.to_thread(
            run_script,
            "gatewayctl",
            "webhooks",
            "set",
            "--merchant",
            MERCHANT,
            "--url",
            receiver.url,
            env={"DATABASE_URL": stack.database_url, "CARD_ENCRYPTION_KEY": card_key, "GATEWAY_ENV": "development"},
        )
        assert registered.returncode == 0, registered.stderr
        (secret,) = [
            line.removeprefix("secret=") for line in registered.stdout.splitlines() if line.startswith("secret=")
        ]
        await stack.start("webhooks")

        client = stack.client(patience=60)
        todo = plans(50, await stack.extra_cards(10), seed=23)
        run_id = uuid.uuid4().hex[:8]
        flows = await run_flows(client, todo[:20], run_id, concurrency=10)
        await receiver.stop()  # down: connections refused while 30 more orders go through
        flows += await run_flows(client, todo[20:], run_id, concurrency=10)
        assert [f.problems for f in flows if f.problems] == []
        refused_while_down = await stack.pool.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND last_error LIKE 'Client%'"
        )
        await receiver.start()

        payments = {f.payment_id: await client.payment(f.payment_id) for f in flows}
        expected = sum(
            1 for p in payments.values() for h in p["history"] if h["status"] in EVENT_STATUSES
        )  # one event per settled status: the receipts' own account
        deadline = time.monotonic() + 120
        while len({r.headers["Gateway-Event-Id"] for r in receiver.accepted()}) < expected:
            assert time.monotonic() < deadline, (len(receiver.accepted()), expected)
            await asyncio.sleep(0.2)
        # The feed shows an event once no older transaction runs on the server: read it again
        # until it has them all (a moment, unless something else holds a transaction open).
        while len(feed := [e for e in await feed_from_start(client) if e["payment"]["id"] in payments]) < expected:
            assert time.monotonic() < deadline, (len(feed), expected)
            await asyncio.sleep(0.2)

    accepted = receiver.accepted()
    for r in receiver.received:
        verify(r.headers["Gateway-Signature"], secret, r.body)
        assert orjson.loads(r.body)["event_id"] == r.headers["Gateway-Event-Id"]
    webhook_events = {r.headers["Gateway-Event-Id"]: orjson.loads(r.body) for r in accepted}
    assert len(receiver.received) > len(accepted) >= expected  # refusals were retried
    assert refused_while_down > 0  # the outage did cost deliveries, retried afterwards

    # Nothing lost, nothing invented: the feed and the webhooks carry the same events, and per
    # payment the feed's order is the order of the statuses in the receipt's history.
    assert len(feed) == expected == len(webhook_events)
    assert {e["event_id"] for e in feed} == set(webhook_events)
    assert all(webhook_events[e["event_id"]] == e for e in feed)  # the same bodies
    per_payment = defaultdict(list)
    for event in feed:
        per_payment[event["payment"]["id"]].append(event["type"])
    for payment_id, payment in payments.items():
        settled = [f"payment.{h['status']}" for h in payment["history"] if h["status"] in EVENT_STATUSES]
        assert per_payment[payment_id] == settled, payment_id
