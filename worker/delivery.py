"""The broker side of one delivered command (ports.Delivery over aio-pika): ack, requeue, and
the publishes that send it to a retry rung or to payments.dead, each confirmed before the ack.
The worker's handling (worker/handling.py) decides which; worker/consumer.py makes one per
delivered message."""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from gateway import messages, topology, tracing
from worker.metrics import WorkerMetrics

PUBLISH_TIMEOUT = 30.0


class AmqpDelivery:
    """ports.Delivery for one aio-pika message. A command leaving for a retry rung or
    payments.dead keeps its body and carries the current trace."""

    def __init__(
        self,
        message: AbstractIncomingMessage,
        retry: AbstractExchange,
        default: AbstractExchange,
        metrics: WorkerMetrics,
    ):
        headers = message.headers or {}
        self.body = message.body
        self.message_id = message.message_id
        # A quorum queue counts the times it handed a message out again in x-delivery-count,
        # which it writes on every redelivery; on a first delivery the header, if any, is the
        # publisher's (RabbitMQ leaves it as it came), so it counts only on a redelivery.
        self.deliveries = 1 + _int(headers.get("x-delivery-count")) if message.redelivered else 1
        self._message = message
        self._retry = retry
        self._default = default
        self._metrics = metrics

    async def ack(self) -> None:
        await self._message.ack()

    async def requeue(self) -> None:
        await self._message.nack(requeue=True)

    async def retry_later(self, delay: int, kind: str | None, rung: int | None) -> None:
        # Only where it goes: the headers exchange routes on it to the rung of that delay.
        headers: dict[str, Any] = {topology.RETRY_QUEUE_HEADER: topology.retry_queue_name(delay)}
        await self._retry.publish(
            self._again(headers),
            routing_key=kind or self._message.routing_key or "",
            mandatory=True,
            timeout=PUBLISH_TIMEOUT,
        )
        if rung is not None:  # a rung taken (not a wait for a lease or for the bank)
            self._metrics.retried(rung)

    async def dead_letter(self, headers: dict[str, Any]) -> None:
        await self._default.publish(
            self._again(headers), routing_key=topology.DEAD_QUEUE, mandatory=True, timeout=PUBLISH_TIMEOUT
        )

    def _again(self, headers: dict[str, Any]) -> aio_pika.Message:
        """The same command (same body, same message id: one command's journey reads as one
        in the broker and the logs), with `headers` and the current trace."""
        return aio_pika.Message(
            body=self.body,
            headers=tracing.inject(headers),
            message_id=self.message_id or messages.new_id("cmd"),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )


def _int(value: object) -> int:
    try:
        return max(0, int(value))  # type: ignore[call-overload]  # any header value; bad ones count as 0
    except (TypeError, ValueError):
        return 0
