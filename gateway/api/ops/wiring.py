"""The console's dead-letter desk, built from gateway.ops.

`gatewayctl dlq` and the console must decide by the same rules, so both run
gateway/ops/replay.py (the policy) over gateway/ops/deadletters.py
(payments.dead), with the worker's WORKER_RETRY_LADDER (the topology it
declares) and WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS (the 24 h guard) read from
the environment (gateway/ops/rules.py).

Every call reads payments.dead the way gatewayctl does: all messages taken
unacknowledged, then given back in order. One call at a time per process, so
two people looking at the console do not take the letters from each other;
another process (gatewayctl, a second API) reading at the same moment sees
the queue without the held letters for that instant, and the listing still
shows those operations from the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import aio_pika
import asyncpg

from gateway import broker, topology
from gateway.api.ops import actions, port
from gateway.ops import deadletters, replay
from gateway.ops.rules import OpsRules

T = TypeVar("T")

# RabbitMQ's failures; the database's go to the console's 503 page like any other request's.
_BROKER_ERRORS = (deadletters.BrokerUnavailable, aio_pika.exceptions.AMQPError)


class _RecordedOperations(replay.StoreOperations):
    """The policy's operations in PostgreSQL, with the console's unpark: it writes the history
    row naming the operator in the same transaction."""

    def __init__(self, pool: asyncpg.Pool, actor: str):
        super().__init__(pool)
        self.actor = actor

    async def unpark(self, operation_id: str, *, forced: bool) -> bool:
        return await actions.unpark(self.pool, operation_id, actor=self.actor, forced=forced)


class WorkerDesk:
    """port.DeadLetterDesk on gateway.ops.replay and gateway.ops.deadletters."""

    def __init__(
        self, pool: Callable[[], asyncpg.Pool], amqp_url: str, ladder: tuple[int, ...], key_age_limit: timedelta
    ):
        self._pool = pool  # the app's pool, opened once the app runs
        self.amqp_url = amqp_url
        self.ladder = ladder
        self.key_age_limit = key_age_limit
        self._queue_lock = asyncio.Lock()

    async def depth(self) -> int:
        try:
            connection = await broker.connect(
                self.amqp_url,
                timeout=deadletters.CONNECT_TIMEOUT,
                client_properties={"connection_name": "gateway-api ops console"},
            )
        except Exception as exc:
            raise port.BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(topology.DEAD_QUEUE, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return 0  # not declared yet: nothing was ever parked through it
            return queue.declaration_result.message_count or 0
        except (*_BROKER_ERRORS, OSError, TimeoutError) as exc:
            raise port.BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            await connection.close()

    async def listing(self) -> Sequence[port.ListedOperation]:
        letters = await self._read_letters()
        return await replay.listing(letters, replay.StoreOperations(self._pool()), self.key_age_limit)

    async def show(self, operation_id: str) -> port.ShownOperation | None:
        letters = await self._read_letters()
        return await replay.show(operation_id, letters, replay.StoreOperations(self._pool()), self.key_age_limit)

    async def replay(self, operation_id: str | None, *, force: bool, actor: str) -> Sequence[port.ReplayOutcome]:
        operations = _RecordedOperations(self._pool(), actor)

        async def run() -> list[replay.Replayed]:
            async with deadletters.DeadLetterQueue(self.amqp_url, self.ladder) as dlq:
                letters = await dlq.take_all()
                try:
                    return await replay.replay(
                        letters, dlq, operations, operation_id=operation_id, force=force, limit=self.key_age_limit
                    )
                finally:
                    await dlq.give_back()

        return await self._on_queue(run)

    async def _read_letters(self) -> list[deadletters.DeadLetter]:
        """Every letter, read and given back before the database is asked (as gatewayctl does)."""

        async def run() -> list[deadletters.DeadLetter]:
            async with deadletters.DeadLetterQueue(self.amqp_url, self.ladder) as dlq:
                try:
                    return await dlq.take_all()
                finally:
                    await dlq.give_back()

        return await self._on_queue(run)

    async def _on_queue(self, run: Callable[[], Awaitable[T]]) -> T:
        async with self._queue_lock:
            try:
                return await run()
            except _BROKER_ERRORS as exc:
                raise port.BrokerUnavailable(f"{type(exc).__name__}: {exc}") from None


def worker_desk(pool: Callable[[], asyncpg.Pool], amqp_url: str) -> WorkerDesk:
    """The desk with the worker's ladder and key-age limit from the environment (a bad value: the
    process exits 2 with a message naming the variable, as gatewayctl does)."""
    cfg = OpsRules.load()
    return WorkerDesk(pool, amqp_url, cfg.retry_ladder, timedelta(hours=cfg.authorize_key_max_age_hours))
