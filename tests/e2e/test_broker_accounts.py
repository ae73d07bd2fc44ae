"""Each merchant reads its events with its own broker account, end to end: payments made through
the API, settled by the worker, published by the relay, read by the merchant's consumer on its
own exchange; another merchant's events and the commands are out of its reach."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import orjson
import pytest

from gateway import messages
from tests.e2e.stack import HAPPY, MERCHANT, OTHER_API_KEY, OTHER_MERCHANT
from tests.support.brokeraccounts import account_url, delete_users, refused

pytestmark = pytest.mark.timeout(180)


async def received(queue: aio_pika.abc.AbstractQueue, until, timeout: float = 30.0) -> list[dict]:
    """Every event in `queue` (bodies, acked) until `until(events)` holds."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        assert time.monotonic() < deadline, f"events so far: {events}"
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        events.append(orjson.loads(message.body))
        await message.ack()
    return events


async def test_a_merchant_reads_its_own_events_with_its_own_account_and_nothing_else(e2e, amount):
    run = uuid.uuid4().hex[:8]
    accounts = {}

    def make_account(merchant: str) -> dict:
        out = e2e.gatewayctl("broker-account", "--json", "--merchant", merchant, "--user", f"{merchant}-{run}")
        return orjson.loads(out)

    try:
        for merchant in (MERCHANT, OTHER_MERCHANT):
            accounts[merchant] = make_account(merchant)
        again = make_account(MERCHANT)
        assert again["created"] is False and again["password"] != accounts[MERCHANT]["password"]  # rotated
        accounts[MERCHANT] = again

        ficmart = await aio_pika.connect(account_url(e2e.amqp_url, accounts[MERCHANT]))
        other = await aio_pika.connect(account_url(e2e.amqp_url, accounts[OTHER_MERCHANT]))
        try:
            mine = await (await ficmart.channel()).declare_queue(f"{MERCHANT}.e2e-{run}", auto_delete=True)
            await mine.bind(messages.events_exchange(MERCHANT), routing_key="#")
            theirs = await (await other.channel()).declare_queue(f"{OTHER_MERCHANT}.e2e-{run}", auto_delete=True)
            await theirs.bind(messages.events_exchange(OTHER_MERCHANT), routing_key="payment.authorized")

            order = f"ord_{uuid.uuid4().hex[:10]}"
            own = await e2e.client(patience=60).authorize(order_id=order, amount=amount(), card=HAPPY)
            foreign = await e2e.client(patience=60, api_key=OTHER_API_KEY).authorize(
                order_id=order, amount=amount(), card=HAPPY
            )
            assert own.status == foreign.status == 202
            (got,) = await received(theirs, lambda events: events)
            assert (got["merchant"], got["payment"]["id"], got["type"]) == (
                OTHER_MERCHANT,
                foreign.body["id"],
                "payment.authorized",
            )
            # Routed when published: had the other's event come here, it would be in the queue now.
            events = await received(mine, lambda events: any(e["payment"]["id"] == own.body["id"] for e in events))
            while (message := await mine.get(fail=False)) is not None:  # whatever else is there
                events.append(orjson.loads(message.body))
                await message.ack()
            assert {e["merchant"] for e in events} == {MERCHANT}
            assert foreign.body["id"] not in {e["payment"]["id"] for e in events}

            async def spy_on_the_other():
                queue = await (await ficmart.channel()).declare_queue(f"{MERCHANT}.spy-{run}", auto_delete=True)
                await queue.bind(messages.events_exchange(OTHER_MERCHANT), routing_key="#")

            async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.ack()

            async def read_the_others_queue():
                queue = await (await ficmart.channel()).get_queue(theirs.name, ensure=False)
                await queue.consume(ignore)

            async def publish_a_command():
                channel = await ficmart.channel(publisher_confirms=True)
                commands = await channel.get_exchange(messages.COMMANDS_EXCHANGE, ensure=False)
                forged = aio_pika.Message(orjson.dumps({"operation_id": "op_forged"}), headers={"x-force": True})
                await commands.publish(forged, routing_key="authorize", timeout=10)

            for attempt in (spy_on_the_other, read_the_others_queue, publish_a_command):
                assert await refused(attempt), f"{attempt.__name__} was allowed"
        finally:
            await ficmart.close()
            await other.close()
    finally:
        await delete_users([account["user"] for account in accounts.values()])
