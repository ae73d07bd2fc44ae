"""gateway-worker: consume payments.work; each command goes through worker.handling.

This module is the plumbing: the pool, the bank client, the AMQP channels and
the topology; one task per delivered message (up to WORKER_CONCURRENCY
handled at once, WORKER_PREFETCH unacknowledged), wrapped in worker.delivery's
AmqpDelivery (ack, requeue, publish to a retry rung or to payments.dead); start
and stop. What happens to a message is worker.handling's business.

Watching it: each command is handled inside its trace (the `traceparent` of the message,
gateway.tracing), which goes on into the bank calls, the events written and any retry or
dead-letter publish; worker.metrics counts bank calls, retries and settles as they happen,
and a periodic task refreshes the gauges read from the database and the broker. gateway-worker
serves them on WORKER_METRICS_PORT (gateway.monitoring), with /healthz and /readyz.

Stopping (SIGTERM): the consumer is cancelled, no bank call starts any more,
the calls under way finish (bounded by BANK_TIMEOUT_SECONDS) and are
recorded, and every message not finished goes back to the queue when the
channel closes. Handling tasks are never cancelled: a bank call abandoned
half-way can leave the bank's work done and its answer unremembered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import uuid

import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from gateway import (
    broker,
    config,
    db,
    logs,
    monitoring,
    process,
    store,
    timefmt,
    topology,
    tracing,
)
from gateway.cards import CardVault
from gateway.domain import OperationKind
from worker import sweeper
from worker.bank import OPERATION, BankClient
from worker.breaker import CircuitBreaker
from worker.delivery import AmqpDelivery
from worker.handling import Handling
from worker.metrics import REFRESH_SECONDS, WorkerMetrics
from worker.payments import PoolPayments
from worker.settings import WorkerSettings

log = logs.get("worker")

DATABASE_PROBE_TIMEOUT = 5.0
BREAKER_REPORT_SECONDS = 60.0  # the ops console shows a worker silent for 3 minutes as stale
_KINDS = {kind.value: kind for kind in OperationKind}


class Worker:
    def __init__(
        self,
        settings: config.Settings,
        cfg: WorkerSettings | None = None,
        *,
        worker_id: str | None = None,
        run_sweeper: bool = True,
    ):
        self.settings = settings
        self.cfg = cfg or WorkerSettings()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.run_sweeper = run_sweeper
        self.metrics = WorkerMetrics()
        self.metrics.watch_breaker(lambda: self.breaker is not None and self.breaker.is_open)
        monitoring.pool_gauges(self.metrics.registry, lambda: self.pool)
        self.vault = CardVault(settings.card_keyring) if settings.card_keyring else None
        self.pool: asyncpg.Pool | None = None
        self.bank: BankClient | None = None
        self.connection: AbstractRobustConnection | None = None
        self.handling: Handling | None = None
        self.payments: PoolPayments | None = None
        self._sem = asyncio.Semaphore(self.cfg.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._stop_sweeper = asyncio.Event()
        self._sweeper: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None
        self._gauges: asyncio.Task | None = None
        self._queue: AbstractQueue | None = None
        self._consume_channel: AbstractChannel | None = None
        self._monitor_channel: AbstractRobustChannel | None = None
        self._consumer_tag: str | None = None
        self._retry_exchange: AbstractExchange | None = None
        self._publish_channel: AbstractChannel | None = None

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The bank's circuit breaker (state, is_open, times_opened), once started."""
        return self.handling.gate.breaker if self.handling is not None else None

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare, consume. A failure closes whatever was opened, then raises."""
        try:
            await self._start()
        except BaseException:
            await self._close()
            raise

    async def _start(self) -> None:
        pool = self.pool = await db.create_pool(
            self.settings.database_url, min_size=2, max_size=self.cfg.db_pool_size, timeouts=self.settings.db_timeouts
        )
        bank = self.bank = BankClient(self.settings.bank_url, timeout=self.cfg.bank_timeout, metrics=self.metrics.bank)
        self.connection = await broker.connect_robust(
            self.settings.amqp_url, client_properties={"connection_name": f"gateway-worker {self.worker_id}"}
        )
        self._publish_channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await topology.declare(self._publish_channel, self.cfg.retry_ladder)
        self._retry_exchange = exchanges[topology.RETRY_EXCHANGE]
        self.payments = PoolPayments(pool, self.metrics)
        self.handling = Handling(
            self.cfg,
            self.payments,
            bank,
            vault=self.vault,
            worker_id=self.worker_id,
            database_probe=lambda: pool.fetchval("SELECT 1", timeout=DATABASE_PROBE_TIMEOUT),
        )
        consume_channel = self._consume_channel = await self.connection.channel()
        await consume_channel.set_qos(prefetch_count=self.cfg.prefetch)
        self._queue = await consume_channel.declare_queue(
            topology.WORK_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        self._consumer_tag = await self._queue.consume(self._on_message)
        if self.run_sweeper:
            self._sweeper = asyncio.create_task(
                sweeper.run(
                    pool,
                    self._stop_sweeper,
                    interval=self.cfg.sweep_interval,
                    idle_seconds=self.cfg.stuck_after + max(self.cfg.retry_ladder),
                    limit=self.cfg.sweep_batch,
                    bank=bank,
                    reconcile_interval=self.cfg.reconcile_interval,
                    reconcile_rate=self.cfg.reconcile_rate,
                    reconcile_limit=self.cfg.reconcile_limit,
                    housekeeping=sweeper.Housekeeping.of(self.cfg),
                    bank_unavailable=lambda: self.breaker is not None and self.breaker.is_open,
                )
            )
        self._reporter = asyncio.create_task(self._report_breaker(pool))
        self._gauges = monitoring.refresh_every(REFRESH_SECONDS, self.refresh_gauges, "worker gauges")
        log.info(
            "worker started",
            worker_id=self.worker_id,
            concurrency=self.cfg.concurrency,
            prefetch=self.cfg.prefetch,
            retry_ladder=list(self.cfg.retry_ladder),
        )

    async def stop(self) -> None:
        """Stop taking messages, let every handling end on its own (never cancelled), close."""
        if self.handling is not None:
            self.handling.stop()
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        while self._tasks:  # a message delivered just before the cancel may still add one
            await asyncio.wait(set(self._tasks))
        self._stop_sweeper.set()
        for task in (self._reporter, self._gauges):
            if task is not None:
                task.cancel()
        if self._sweeper is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._sweeper, 10)
        await self._close()
        batched = {}
        if self.payments is not None:
            for name, batcher in (
                ("claims", self.payments.claims),
                ("outcomes", self.payments.outcomes),
                ("notes", self.payments.notes),
            ):
                batched[f"{name}_per_statement"] = round(batcher.requests / max(batcher.batches, 1), 2)
        log.info("worker stopped", worker_id=self.worker_id, **batched)

    async def _report_breaker(self, pool: asyncpg.Pool) -> None:
        """The breaker's state in bank_circuit, for the ops console: at once when it changes,
        and every BREAKER_REPORT_SECONDS anyway, so a quiet, healthy worker does not look gone."""
        reported: tuple[bool, int] | None = None
        last = 0.0
        loop = asyncio.get_running_loop()
        while True:
            breaker = self.breaker
            if breaker is not None:
                now_state = (breaker.is_open, breaker.times_opened)
                if now_state != reported or loop.time() - last >= BREAKER_REPORT_SECONDS:
                    try:
                        await store.record_circuit_state(
                            pool,
                            worker_id=self.worker_id,
                            open=breaker.is_open,
                            changed_at=timefmt.now(),
                            detail=f"{breaker.state.value}; opened {breaker.times_opened} time(s) since start",
                        )
                        reported, last = now_state, loop.time()
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.debug("breaker state not reported", error=type(exc).__name__)
            await asyncio.sleep(1.0)

    async def refresh_gauges(self) -> None:
        """Parked operations and flagged payments (one query), messages in payments.dead."""
        if self.pool is None or self.connection is None:
            return
        backlog = await store.pipeline_backlog(self.pool)
        self.metrics.parked.set(backlog["parked"])
        self.metrics.flagged.set(backlog["flagged"])
        if self._monitor_channel is None or self._monitor_channel.is_closed:
            # A channel of its own: a failed passive declare closes the channel it runs on.
            self._monitor_channel = await self.connection.channel()
        # robust=False: a robust channel answers a repeated passive declare from its cache.
        dead = await self._monitor_channel.declare_queue(topology.DEAD_QUEUE, passive=True, robust=False)
        self.metrics.dead_letters.set(dead.declaration_result.message_count or 0)

    async def readiness(self) -> dict[str, bool]:
        """/readyz: the database answers, the broker connection is up, payments.work is consumed."""
        checks = await monitoring.database_and_broker(self.pool, self.connection)
        consuming = (
            self._consumer_tag is not None
            and self._consume_channel is not None
            and not self._consume_channel.is_closed
            and not (self.handling is not None and self.handling.stopping.is_set())
        )
        return {**checks, "consuming": consuming}

    async def _close(self) -> None:
        if self.connection is not None:
            await self.connection.close()  # unacked messages go back to the queue
            self.connection = None
        if self.bank is not None:
            await self.bank.close()
            self.bank = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # ---- one message ----------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A task of our own: the AMQP library cancels its callback tasks when a channel
        # closes, and a bank call must never be abandoned half-way.
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        handling, retry = self.handling, self._retry_exchange
        assert handling is not None and retry is not None and self._publish_channel is not None  # started
        # The routing key is the operation's kind (topology); only a label and a span name
        # are taken from it, the operation itself is read from the database.
        kind = _KINDS.get(message.routing_key or "")
        OPERATION.set(kind)  # this task's own context: its bank calls are for this command
        delivery = AmqpDelivery(message, retry, self._publish_channel.default_exchange, self.metrics)
        async with self._sem:
            with tracing.continued(
                message.headers, f"process {kind.value if kind else 'command'}", tracing.SpanKind.CONSUMER
            ):
                await handling.handle(delivery)


# ---- the process --------------------------------------------------------------------------


async def serve(settings: config.Settings, cfg: WorkerSettings, stop: asyncio.Event, metrics_host: str) -> None:
    worker = Worker(settings, cfg)
    endpoint = monitoring.Endpoint(worker.metrics.registry, worker.readiness)
    if cfg.metrics_port:
        await endpoint.start(metrics_host, cfg.metrics_port)
        log.info("metrics and health served", host=metrics_host, port=cfg.metrics_port)
    try:
        await process.start_with_retries(worker.start, what="worker", stop=stop)
        process.started()
        await stop.wait()
        log.info("stopping: no new messages, finishing the bank calls under way")
        await worker.stop()
    finally:
        await endpoint.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway-worker",
        description="Consume payments.work: call the bank for each operation and record the outcome; "
        "also sweeps stuck operations and lapsed holds.",
        epilog=config.epilog(config.Settings, WorkerSettings, unused=("GATEWAY_API_KEYS",)),
    )
    monitoring.add_host_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = config.load(uses_card_key=True)
    cfg = WorkerSettings.load()
    process.give_way(cfg.nice)
    logs.setup(settings.log_level, "gateway-worker")
    tracing.setup("gateway-worker")
    try:
        process.run(lambda stop: serve(settings, cfg, stop, args.metrics_host))
    except monitoring.ListenError as exc:
        print(f"gateway-worker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
