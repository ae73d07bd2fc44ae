"""payments.dead as gatewayctl uses it: read without losing or reordering anything.

Reading: every message is taken with basic.get and manual acknowledgement,
so all of them are held, unacknowledged, by this one channel at the same
time (up to MAX_DEAD_LETTERS). What is not replayed or dropped is given
back with basic.nack(requeue=True), one message at a time in delivery
order: RabbitMQ puts returned messages back at the head of the queue in
the order they come back, so the queue reads as before. basic.nack, not
basic.reject: from RabbitMQ 4.3 a reject counts as a failed delivery
towards a quorum queue's delivery limit, a nack does not. If this process
dies while holding them, the broker returns them all by itself when the
connection drops: nothing is acked before its work is done.

The policy (gateway/ops/replay.py) sees DeadLetter values only; the AMQP
messages stay here. Every letter has a handle that stays the same from one
read to the next (its message id, or a hash of its body and headers), so a
letter that names no operation can still be shown and dropped by name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from gateway import broker, messages, topology
from gateway.timefmt import parse

MAX_DEAD_LETTERS = 10_000  # held at once by one command; more are left in the queue untouched
CONNECT_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 30.0


# A message id usable as a handle as it is; any other letter is named by a hash.
_HANDLE = re.compile(r"[A-Za-z0-9_.:-]{1,80}")
# Headers the broker rewrites while a letter waits (a quorum queue counts each
# requeue): not part of what the letter is.
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be reached."""


@dataclass(frozen=True)
class DeadLetter:
    """One message of payments.dead, as read (headers decoded to text)."""

    position: int  # its place in the queue when read: the queue's handle on the held message
    operation_id: str | None  # None: a message that names no operation
    headers: dict[str, Any]
    body: bytes
    message_id: str | None = None

    @property
    def handle(self) -> str:
        """Its name for ops: the message id when it has a plain one, else `sha-` and a hash
        of body and headers (identical letters share it, and go together)."""
        if self.message_id and _HANDLE.fullmatch(self.message_id):
            return self.message_id
        digest = hashlib.sha256(self.body)
        own = {k: v for k, v in self.headers.items() if k not in _BROKER_HEADERS}
        digest.update(orjson.dumps(own, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str))
        return f"sha-{digest.hexdigest()[:16]}"

    @property
    def parked_at(self) -> datetime | None:
        value = self.headers.get("parked_at")
        try:
            return parse(value) if isinstance(value, str) else None
        except ValueError:
            return None


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _readable(op_id: Any) -> str | None:
    return op_id if messages.is_operation_id(op_id) else None


def read_letter(position: int, body: bytes, headers: dict[str, Any] | None, message_id: str | None) -> DeadLetter:
    """The operation id from the `operation_id` header, else from the command body; None if
    neither has a readable one."""
    texts = {k: _text(v) for k, v in (headers or {}).items()}
    op_id = _readable(texts.get("operation_id"))
    if op_id is None:
        try:
            op_id = _readable(orjson.loads(body)["operation_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            op_id = None
    return DeadLetter(position, op_id, texts, body, message_id)


class DeadLetterQueue:
    """payments.dead and payments.commands over one connection (see the module docstring)."""

    def __init__(self, amqp_url: str, ladder: tuple[int, ...]):
        self.amqp_url = amqp_url
        self.ladder = ladder
        self._connection: AbstractConnection | None = None
        self._held: dict[int, AbstractIncomingMessage] = {}

    async def __aenter__(self) -> DeadLetterQueue:
        try:
            self._connection = await broker.connect(
                self.amqp_url, timeout=CONNECT_TIMEOUT, client_properties={"connection_name": "gatewayctl"}
            )
        except Exception as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            # Publishing on its own channel: a failed publish that closes a channel must not
            # take the held deliveries with it.
            publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            exchanges = await topology.declare(publish_channel, self.ladder)
            self._commands: AbstractExchange = exchanges[messages.COMMANDS_EXCHANGE]
            get_channel = await self._connection.channel(publisher_confirms=False)
            self._queue: AbstractQueue = await get_channel.get_queue(topology.DEAD_QUEUE, ensure=True)
        except BaseException:
            await self._connection.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def take_all(self) -> list[DeadLetter]:
        """Every message in the queue (oldest first), held unacknowledged by us."""
        letters: list[DeadLetter] = []
        while len(letters) < MAX_DEAD_LETTERS:
            message = await self._queue.get(no_ack=False, fail=False, timeout=CONNECT_TIMEOUT)
            if message is None:
                break
            position = len(letters)
            self._held[position] = message
            letters.append(read_letter(position, message.body, message.headers, message.message_id))
        return letters

    async def give_back(self) -> None:
        """Every message still held goes back, in delivery order: the queue keeps its order."""
        for position in sorted(self._held):
            message = self._held.pop(position)
            if not message.processed:
                await message.nack(requeue=True)

    async def drop(self, letters: Iterable[DeadLetter]) -> None:
        """Acknowledge these: they leave the queue for good."""
        for letter in letters:
            message = self._held.pop(letter.position, None)
            if message is not None and not message.processed:
                await message.ack()

    async def send_command(self, operation_id: str, kind: str) -> None:
        """The operation's command, as the relay sends it (the unpark reset its ladder and said
        whether it is forced, on its row); returns once the broker has confirmed it (persistent,
        mandatory)."""
        cmd = messages.command(operation_id, kind)
        headers: dict[str, Any] = dict(cmd.headers or {})  # the current trace, nothing else
        message = aio_pika.Message(
            body=cmd.body,
            headers=headers,
            message_id=cmd.message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._commands.publish(message, routing_key=cmd.routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT)
