"""A bank that keeps failing two operations (500s) past the retry ladder: parked for ops,
then replayed. (A bank that is down altogether parks nothing: the worker's circuit
breaker holds the operations until it is back; tests/e2e/test_outage.py.)

The ladder of the e2e stack is 1,2,4 s after three quick tries, so an operation
is parked about 8 s after its first failure. Ops then brings it back with
`gatewayctl dlq replay --all`.

And poisoned commands (an operation id no SQL should see, a command the broker
keeps handing out): in payments.dead at once or after the bound, dropped with
`gatewayctl dlq drop`.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest

from gateway import topology
from gateway.messages import COMMANDS_EXCHANGE
from tests.e2e.flows import bank_entries
from tests.e2e.stack import HAPPY

pytestmark = pytest.mark.timeout(150)


async def dead_letters(stack) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything in payments.dead, left in place (read, then requeued)."""
    connection = await aio_pika.connect(stack.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        found = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append(message)
        for message in found:
            await message.nack(requeue=True)
        return found
    finally:
        await connection.close()


async def wait_until(client, payment_id: str, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        payment = await client.payment(payment_id)
        if done(payment):
            return payment
        assert time.monotonic() < deadline, payment
        await asyncio.sleep(0.3)


async def failing(stack, path: str) -> None:
    """Every request to `path` answers 500 until the faults are cleared."""
    fault = {"action": "error", "path": path, "method": "POST", "status": 500, "times": 1000}
    async with stack.http.post(f"{stack.bank_url}/_mock/faults", json=fault) as resp:
        assert resp.status == 201, await resp.text()


async def test_failures_past_the_ladder_park_then_replay_settles_once(e2e, client, amount):
    held, fresh = amount(), amount()
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=held, card=HAPPY)
    first = await client.settled(reply.body["id"], timeout=30)
    assert first["status"] == "authorized"

    await failing(e2e, "/api/v1/captures")
    await failing(e2e, "/api/v1/authorizations")
    try:
        capture = await client.act(first["id"], "capture")
        assert capture.status == 202
        reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=fresh, card=HAPPY)
        assert reply.status == 202
        second_id = reply.body["id"]
        parked = [
            await wait_until(client, pid, lambda p: p["attention_required"], timeout=60)
            for pid in (first["id"], second_id)
        ]
        assert [p["status"] for p in parked] == ["capturing", "pending"]  # the in-progress status stays
        assert all(p["last_error"]["retryable"] for p in parked)
        for p in parked:
            assert await e2e.events.wait_for(
                lambda p=p: e2e.events.types(p["id"])["payment.attention_required"] >= 1, 15
            )
        dead = {(m.headers or {}).get("payment_id") for m in await dead_letters(e2e)}
        assert {first["id"], second_id} <= dead
    finally:
        async with e2e.http.delete(f"{e2e.bank_url}/_mock/faults") as resp:
            assert resp.status == 200

    e2e.gatewayctl("dlq", "replay", "--all")
    captured = await client.settled(first["id"], timeout=30)
    authorized = await client.settled(second_id, timeout=30)
    assert (captured["status"], captured["attention_required"]) == ("captured", False)
    assert (authorized["status"], authorized["attention_required"]) == ("authorized", False)
    ledger = await e2e.bank.ledger()
    a, b = bank_entries(ledger, held), bank_entries(ledger, fresh)
    assert len(a["authorizations"]) == 1 and len(a["captures"]) == 1
    assert a["captures"][0]["capture_id"] == captured["bank"]["capture_id"]
    assert len(b["authorizations"]) == 1 and b["captures"] == []  # exactly one hold
    assert b["authorizations"][0]["authorization_id"] == authorized["bank"]["authorization_id"]
    assert await e2e.events.wait_for(lambda: e2e.events.types(second_id)["payment.authorized"] == 1, 15)
    assert await e2e.events.wait_for(lambda: e2e.events.types(first["id"])["payment.captured"] == 1, 15)
    assert not [m for m in await dead_letters(e2e) if (m.headers or {}).get("payment_id") in (first["id"], second_id)]


async def test_poisoned_commands_reach_the_dead_letter_queue_and_are_dropped(e2e):
    """A command naming an operation id with a NUL byte (which no SQL statement may see): it does
    not go round the queue; it waits in payments.dead for ops to drop. (One the broker handed
    out too often goes there too, tests/unit/test_handling.py; a publisher's own
    x-delivery-count decides nothing, tests/integration/test_worker.py.)"""
    connection = await aio_pika.connect(e2e.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange(COMMANDS_EXCHANGE)
        poison = aio_pika.Message(b'{"operation_id": "op_\\u0000poison"}', message_id="cmd_poison_nul")
        await commands.publish(poison, routing_key="authorize")
    finally:
        await connection.close()
    deadline = time.monotonic() + 20
    while "cmd_poison_nul" not in {m.message_id for m in await dead_letters(e2e)}:
        assert time.monotonic() < deadline, "the poisoned command never reached payments.dead"
        await asyncio.sleep(0.2)
    assert "cmd_poison_nul" in e2e.gatewayctl("dlq", "list")
    dropped = e2e.gatewayctl("dlq", "drop", "cmd_poison_nul")
    assert "1 letter(s) dropped" in dropped
    assert "cmd_poison_nul" not in {m.message_id for m in await dead_letters(e2e)}
