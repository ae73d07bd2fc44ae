"""RabbitMQ topology, declared idempotently by whichever process starts first.

    payments.commands  topic     routing key = operation kind -> payments.work
    payments.work      quorum    the workers' queue, bound to every kind
    payments.retry     headers   header retry-queue=<name> -> that rung
    payments.retry.quorum.Ns
                       quorum    x-message-ttl N s, dead-letters back to payments.commands
                                 with the original routing key, at least once
    payments.dead      quorum    operations that exhausted their retries (ops replays)
    payments.events.<merchant>
                       topic     payment.<status> of that merchant's payments, read with
                                 its own broker account (gatewayctl/brokeraccount.py); declared
                                 by the relay before it publishes the merchant's first event
                                 and by `gatewayctl broker-account`. Published without
                                 `mandatory`: with nobody bound, the broker drops them

Only the gateway's own broker user may use the rest: payments.commands is internal.

A rung's name carries its delay, so two ladders (a test's short one and the
default) can share a vhost without conflicting queue arguments.

Every queue that holds a command is a quorum queue: on a cluster it lives on every node, so a
node's death neither loses the commands waiting in it nor stops a process declaring it when it
reconnects to another node (a classic queue whose home node is down refuses the declaration,
and with it the whole reconnection). The rungs were classic queues named payments.retry.Ns
before: a queue's type cannot change, hence the new names. The old ones take nothing new and
empty themselves into payments.commands within their delay; ops delete them after.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from gateway.domain import OperationKind
from gateway.messages import COMMANDS_EXCHANGE

WORK_QUEUE = "payments.work"
RETRY_EXCHANGE = "payments.retry"
RETRY_QUEUE_PREFIX = "payments.retry.quorum."
DEAD_QUEUE = "payments.dead"
# An earlier version kept every event in this queue only so that a mandatory publish of
# an event always found a queue: nobody read it. Deleted where it still exists.
OBSOLETE_EVENTS_ARCHIVE = "payments.events.archive"

# The one header of ours on a command: where the retry exchange routes it. What a worker does
# with a command is decided from the operation's row (rungs taken, a forced replay), never
# from a header a publisher could set.
RETRY_QUEUE_HEADER = "retry-queue"  # headers-exchange match key (x-* headers are not matched)


def retry_queue_name(delay_seconds: int) -> str:
    """payments.retry.quorum.1s, ....30s, ....2m, ....1h..."""
    if delay_seconds % 3600 == 0:
        return f"{RETRY_QUEUE_PREFIX}{delay_seconds // 3600}h"
    if delay_seconds % 60 == 0:
        return f"{RETRY_QUEUE_PREFIX}{delay_seconds // 60}m"
    return f"{RETRY_QUEUE_PREFIX}{delay_seconds}s"


async def declare_events_exchange(channel: AbstractChannel, merchant_exchange: str) -> AbstractExchange:
    """A merchant's events exchange (payments.events.<merchant>); safe to repeat."""
    return await channel.declare_exchange(merchant_exchange, aio_pika.ExchangeType.TOPIC, durable=True)


def rung_for(ladder: tuple[int, ...], at_least: float) -> int:
    """The shortest delay of the ladder that is >= at_least seconds (else the longest)."""
    for delay in ladder:
        if delay >= at_least:
            return delay
    return ladder[-1]


async def declare(channel: AbstractChannel, ladder: tuple[int, ...]) -> dict[str, AbstractExchange]:
    """Declare everything; safe to repeat. Returns the exchanges by name."""
    commands = await channel.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    retry = await channel.declare_exchange(RETRY_EXCHANGE, aio_pika.ExchangeType.HEADERS, durable=True)

    work = await channel.declare_queue(WORK_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    for kind in OperationKind:
        await work.bind(commands, routing_key=kind.value)

    for delay in ladder:
        name = retry_queue_name(delay)
        rung = await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": COMMANDS_EXCHANGE,
                # A quorum queue dead-letters at most once unless told otherwise: a command
                # would be lost if payments.commands could not take it at that moment.
                # At least once needs reject-publish overflow (the rungs have no length limit).
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        await rung.bind(retry, routing_key="", arguments={"x-match": "all", RETRY_QUEUE_HEADER: name})

    await channel.declare_queue(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.queue_delete(OBSOLETE_EVENTS_ARCHIVE)
    return {COMMANDS_EXCHANGE: commands, RETRY_EXCHANGE: retry}
