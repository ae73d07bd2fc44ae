"""A merchant's own broker account (gatewayctl broker-account) against the real RabbitMQ and its
management API: the merchant reads its own events, published by the real relay, and nothing
else on the gateway's vhost: not another merchant's events, not the commands."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import orjson
import pytest

from gateway import messages, topology
from gatewayctl.brokeraccount import vhost_of
from harness.procs import run_script
from tests.support.brokeraccounts import MANAGEMENT_URL, account_url, delete_users, management, refused
from worker import settings as wsettings
from worker.relay import Relay

pytestmark = pytest.mark.timeout(120)

KEYS = "alpha:sk_test_alpha_merchant,beta:sk_test_beta_merchant"


def gatewayctl(amqp_url: str, *args: str):
    return run_script(
        "gatewayctl",
        *args,
        timeout=60,
        env={
            "AMQP_URL": amqp_url,
            "GATEWAY_API_KEYS": KEYS,
            "RABBITMQ_MANAGEMENT_URL": MANAGEMENT_URL,
            "GATEWAY_ENV": "development",
        },
    )


@pytest.fixture
async def accounts(amqp_url) -> AsyncIterator[dict[str, dict]]:
    """alpha's and beta's accounts (users of this run only), as the command prints them, with
    the merchant's AMQP URL (`url`)."""
    run = uuid.uuid4().hex[:8]
    accounts, users = {}, []
    try:
        for merchant in ("alpha", "beta"):
            user = f"{merchant}-{run}"
            result = gatewayctl(amqp_url, "broker-account", "--json", "--merchant", merchant, "--user", user)
            assert result.returncode == 0, result.stderr
            account = orjson.loads(result.stdout)
            users.append(account["user"])
            assert account["exchange"] == f"payments.events.{merchant}" and account["created"] is True
            accounts[merchant] = {**account, "url": account_url(amqp_url, account)}
        yield accounts
    finally:
        await delete_users(users)


@pytest.fixture
async def relay(database_url, amqp_url, pool) -> AsyncIterator[Relay]:
    await pool.execute("DELETE FROM outbox")
    relay = Relay(database_url, amqp_url, wsettings.RelaySettings(poll_seconds=0.2), ladder=(1, 2, 3))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


async def write_event(pool, merchant: str, payment_id: str) -> str:
    payment = {"id": payment_id, "status": "captured"}
    event = messages.event("payment.captured", payment, datetime.now(UTC), merchant=merchant)
    await pool.execute(
        "INSERT INTO outbox (exchange, routing_key, message_id, body, headers) VALUES ($1, $2, $3, $4, $5)",
        event.exchange,
        event.routing_key,
        event.message_id,
        event.body,
        event.headers,
    )
    return event.message_id


async def test_a_merchant_reads_its_own_events_and_nothing_else(accounts, relay, pool, amqp_url):
    alpha = await aio_pika.connect(accounts["alpha"]["url"])
    beta = await aio_pika.connect(accounts["beta"]["url"])
    try:
        # Each merchant binds a queue of its own (named with its prefix) to its own exchange.
        received: list[aio_pika.abc.AbstractIncomingMessage] = []
        arrived = asyncio.Event()

        async def on_alpha(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            received.append(message)
            arrived.set()
            await message.ack()

        alpha_channel = await alpha.channel()
        alpha_queue = await alpha_channel.declare_queue("alpha.payments", durable=True)
        await alpha_queue.bind("payments.events.alpha", routing_key="#")
        await alpha_queue.consume(on_alpha)
        beta_channel = await beta.channel()
        beta_queue = await beta_channel.declare_queue("beta.payments", durable=True)
        await beta_queue.bind("payments.events.beta", routing_key="payment.*")

        # beta's event goes out before alpha's, on the relay's one channel: in order.
        beta_id = await write_event(pool, "beta", "pay_beta")
        alpha_id = await write_event(pool, "alpha", "pay_alpha")
        assert await relay.drain() == (2, 0)
        await asyncio.wait_for(arrived.wait(), 30)
        assert [m.message_id for m in received] == [alpha_id]
        body = orjson.loads(received[0].body)
        assert body["merchant"] == "alpha" and body["payment"]["id"] == "pay_alpha"
        assert received[0].routing_key == "payment.captured" and received[0].headers["merchant"] == "alpha"
        got = await beta_queue.get(timeout=10)
        assert got is not None and got.message_id == beta_id
        await got.ack()

        async def attempt(what):
            channel = await alpha.channel(publisher_confirms=True)
            try:
                await what(channel)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

        async def bind_to_beta(channel):
            queue = await channel.declare_queue("alpha.spy", auto_delete=True)
            await queue.bind("payments.events.beta", routing_key="#")

        async def consume_beta_queue(channel):
            queue = await channel.get_queue("beta.payments", ensure=False)
            await queue.consume(on_alpha)

        async def declare_unprefixed(channel):
            await channel.declare_queue("payments.mine", auto_delete=True)

        async def bind_to_commands(channel):
            queue = await channel.declare_queue("alpha.commands", auto_delete=True)
            await queue.bind(messages.COMMANDS_EXCHANGE, routing_key="#")

        async def publish_command(channel):
            commands = await channel.get_exchange(messages.COMMANDS_EXCHANGE, ensure=False)
            command = aio_pika.Message(b'{"operation_id": "op_forged"}', headers={"x-force": True})
            await commands.publish(command, routing_key="authorize", timeout=10)

        async def publish_to_work_queue(channel):
            command = aio_pika.Message(b'{"operation_id": "op_forged"}')
            await channel.default_exchange.publish(command, routing_key=topology.WORK_QUEUE, timeout=10)

        for what in (
            bind_to_beta,
            consume_beta_queue,
            declare_unprefixed,
            bind_to_commands,
            publish_command,
            publish_to_work_queue,
        ):
            assert await refused(lambda what=what: attempt(what)), f"{what.__name__} was allowed"
    finally:
        await alpha.close()
        await beta.close()
    # What one merchant may take of the broker is bounded: its connections, channels and queues.
    (limits,) = await management("GET", "user-limits", accounts["alpha"]["user"])
    assert limits["value"] == {"max-connections": 20, "max-channels": 100}
    deadline = time.monotonic() + 60
    while "operator_policy" not in (queue := await management("GET", "queues", vhost_of(amqp_url), "alpha.payments")):
        assert time.monotonic() < deadline, queue  # the management API shows it once it has the queue's stats
        await asyncio.sleep(0.5)
    assert queue["operator_policy"] == "gateway-merchant-alpha"
    assert queue["effective_policy_definition"]["max-length"] == 100_000
    # Nothing of alpha's reached the workers' queue.
    gateway = await aio_pika.connect(amqp_url)
    try:
        channel = await gateway.channel()
        work = await channel.declare_queue(topology.WORK_QUEUE, passive=True)
        assert work.declaration_result.message_count == 0
    finally:
        await gateway.close()


async def test_the_command_refuses_unknown_and_reserved_merchants(amqp_url):
    result = gatewayctl(amqp_url, "broker-account", "--merchant", "gamma")
    assert result.returncode == 2 and "not a merchant of GATEWAY_API_KEYS" in result.stderr
    result = run_script(
        "gatewayctl",
        "broker-account",
        "--merchant",
        "payments",
        env={"AMQP_URL": amqp_url, "GATEWAY_API_KEYS": "payments:sk_test_payments_1", "GATEWAY_ENV": "development"},
    )
    assert result.returncode == 2 and "queues would be named like ours" in result.stderr
