"""AMQP_URL naming several nodes (gateway.broker) against the real RabbitMQ.

Each "node" is a TCP proxy in front of the one local broker: closing a proxy is a node
dying (its connections cut, no more accepts). A connection must move on to the next node
by itself, with its consumer restored and publisher confirms still working there.
"""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlparse, urlunparse

import aio_pika
import pytest
from pamqp.commands import Basic

from gateway import broker
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


def _through(amqp_url: str, proxy: TcpProxy) -> str:
    parts = urlparse(amqp_url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunparse(parts._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}"))


async def _nodes(amqp_url: str, count: int) -> list[TcpProxy]:
    parts = urlparse(amqp_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5672)
    return [await TcpProxy(target).start() for _ in range(count)]


async def test_a_robust_connection_moves_to_the_next_node_when_its_node_dies(amqp_url):
    nodes = await _nodes(amqp_url, 2)
    cluster_url = ",".join(_through(amqp_url, node) for node in nodes)
    connection = await broker.connect_robust(cluster_url)
    queue_name = f"test.nodes.{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            await received.put(message.body)

    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True)
        await queue.consume(on_message)
        await channel.default_exchange.publish(aio_pika.Message(b"before"), routing_key=queue_name)
        assert await asyncio.wait_for(received.get(), 10) == b"before"
        assert str(nodes[0].port) in connection.node

        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        await nodes[0].close()
        await asyncio.wait_for(reconnected.wait(), 20)
        assert str(nodes[1].port) in connection.node

        # The restored channel publishes with confirms and the restored consumer receives.
        confirmation = await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key=queue_name)
        assert isinstance(confirmation, Basic.Ack)
        # (an ack in flight when the node died is lost with it: "before" may come again)
        while (body := await asyncio.wait_for(received.get(), 10)) != b"after":
            assert body == b"before"
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
        for node in nodes:
            await node.close()


async def test_the_first_node_that_answers_takes_the_connection(amqp_url):
    nodes = await _nodes(amqp_url, 3)
    cluster_url = ",".join(_through(amqp_url, node) for node in nodes)
    await nodes[0].close()
    await nodes[1].close()
    robust = await broker.connect_robust(cluster_url, timeout=5)
    plain = await broker.connect(cluster_url, timeout=5)
    try:
        assert str(nodes[2].port) in robust.node
        assert plain.url.port == nodes[2].port
    finally:
        await robust.close()
        await plain.close()
        await nodes[2].close()


async def test_no_node_answering_raises_the_last_failure(amqp_url):
    nodes = await _nodes(amqp_url, 2)
    cluster_url = ",".join(_through(amqp_url, node) for node in nodes)
    for node in nodes:
        await node.close()
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await broker.connect_robust(cluster_url, timeout=5)
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await broker.connect(cluster_url, timeout=5)
