"""What a relay crash leaves behind: the same command twice in payments.work.

The relay killed between the broker's confirm and marking the rows (crash point
relay.after_publish) publishes those rows again, so a worker may receive a command
while it is still handling the first copy. The second copy must not start a second
bank call for the operation: the bank has no in-flight lock, and two concurrent
authorizations with one key place two holds (docs/bank.md).

Found by the long crash run (a payment with two holds, same idempotency key).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import orjson
import pytest

from gateway.messages import COMMANDS_EXCHANGE
from tests.e2e.stack import HAPPY, Stack, running_stack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def stack(server_urls, card_key):
    async with running_stack(server_urls, card_key) as s:
        yield s


async def publish_command(stack: Stack, operation_id: str, kind: str) -> None:
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps({"operation_id": operation_id}),
                message_id=f"cmd_{uuid.uuid4().hex}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=kind,
        )
    finally:
        await connection.close()


async def test_a_duplicate_command_during_the_bank_call_places_no_second_hold(stack):
    await stack.bank.chaos(min_latency_ms=1500, max_latency_ms=1500)  # the first call is still running...
    amount = 31_337
    client = stack.client()
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=amount, card=HAPPY)
    pid = reply.body["id"]
    deadline = time.monotonic() + 20
    while True:  # ...once the worker holds the lease for it
        op = await stack.pool.fetchrow("SELECT id, attempts FROM operations WHERE payment_id = $1", pid)
        if op["attempts"] >= 1:
            break
        assert time.monotonic() < deadline, "the worker never claimed the operation"
        await asyncio.sleep(0.05)
    await publish_command(stack, op["id"], "authorize")  # what the relay republishes after a crash
    payment = await client.settled(pid, timeout=30)
    await asyncio.sleep(2.0)  # a second call, if one was started, has reached the bank by now
    await stack.bank.chaos(min_latency_ms=0, max_latency_ms=20)
    assert payment["status"] == "authorized"
    holds = [a for a in (await stack.bank.ledger())["authorizations"] if a["amount"] == amount]
    assert [h["authorization_id"] for h in holds] == [payment["bank"]["authorization_id"]], holds
