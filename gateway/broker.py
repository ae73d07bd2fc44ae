"""RabbitMQ connections that follow a cluster: AMQP_URL may name several nodes.

    AMQP_URL=amqp://gw:pw@mq1:5672/gateway,amqp://gw:pw@mq2:5672/gateway,amqp://gw:pw@mq3:5672/gateway

`connect` opens a plain connection to the first node that answers, trying them in the
order written. `connect_robust` does the same, and the connection it returns reconnects by
itself when its node goes away, to the next node in turn (round robin, one node per
attempt), restoring its channels, consumers and declarations there.

aio-pika's robust connection reconnects only to the URL it was given; all the rest of its
machinery (restoring channels and consumers, the retry loop) is kept. `NodeFollowingConnection`
changes one thing: which URL each reconnection attempt dials. The robust connection starts
every attempt by dropping its transport (`self.transport = None`) and then dials `self.url`,
so that is where the next node is chosen.

A node that dies takes with it every publish not yet confirmed and every delivery not yet
acked: the relay puts its unconfirmed rows back and publishes them again, and the broker
delivers the unacked messages again (consumers dedupe on message_id). Nothing here changes
that: a new node is only a new connection.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, UnderlayConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

# Seconds between reconnection attempts (aio-pika's default is 5): a quorum queue elects a new
# leader in well under a second, so waiting longer only delays the work.
RECONNECT_SECONDS = 0.5


def node_urls(amqp_url: str) -> list[str]:
    """The nodes of AMQP_URL, in the order written (one or more comma-separated URLs)."""
    return [part.strip() for part in amqp_url.split(",") if part.strip()]


class NodeFollowingConnection(aio_pika.RobustConnection):
    """A robust connection whose reconnection attempts go to the nodes in turn."""

    def __init__(self, urls: list[str], first: int = 0, **kwargs: Any):
        self._nodes = [URL(url) for url in urls]
        self._node = first % len(self._nodes)
        self._dialled = False
        super().__init__(self._nodes[self._node], **kwargs)

    @property
    def transport(self) -> UnderlayConnection | None:
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        # Cleared once by __init__ (before `_transport` exists), then at the start of every
        # connection attempt: the first attempt dials the node this connection was made for,
        # every later one the next node. (close() clears it too: a closed connection dials
        # nothing again, so moving on then changes nothing.)
        if value is None and hasattr(self, "_transport"):
            if self._dialled:
                self._node = (self._node + 1) % len(self._nodes)
                self.url = self._nodes[self._node]
            self._dialled = True
        self._transport = value

    @property
    def node(self) -> str:
        """The node this connection is on (or dials next), without its password."""
        return str(self)


async def connect(amqp_url: str, **kwargs: Any) -> AbstractConnection:
    """A plain connection to the first node of AMQP_URL that accepts one (the last failure
    raised when none does). `kwargs` go to aio_pika.connect (timeout, client_properties)."""
    last: BaseException | None = None
    for url in node_urls(amqp_url):
        try:
            return await aio_pika.connect(url, **kwargs)
        except CONNECTION_EXCEPTIONS as exc:
            last = exc
    assert last is not None  # AMQP_URL names at least one node (gateway.config)
    raise last


async def connect_robust(amqp_url: str, *, timeout: float | None = None, **kwargs: Any) -> NodeFollowingConnection:
    """A connection that reconnects by itself, to another node of AMQP_URL when its own is
    gone. It is first made to the first node that accepts it, tried in the order written."""
    urls = node_urls(amqp_url)
    last: BaseException | None = None
    for first in range(len(urls)):
        connection = NodeFollowingConnection(urls, first, reconnect_interval=RECONNECT_SECONDS, **kwargs)
        try:
            await connection.connect(timeout=timeout)
        except CONNECTION_EXCEPTIONS as exc:
            last = exc
            await connection.close()
            continue
        return connection
    assert last is not None
    raise last
