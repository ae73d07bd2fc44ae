"""gateway-relay: publish the outbox to RabbitMQ, at least once, never lost.

One batch is one PostgreSQL transaction:

    DELETE the oldest rows ... FOR UPDATE SKIP LOCKED RETURNING them   (other relays skip them)
    publish every row (concurrently, persistent, publisher confirms; commands mandatory)
    put back the rows the broker did not confirm
    COMMIT

A row is gone only once the transaction commits, after its confirm, so a crash
anywhere before COMMIT publishes it again later (duplicates are possible,
consumers dedupe on message_id); a returned (unroutable) or nacked command is
put back and retried later: that row alone waits (with a growing delay), the
rows behind it go on. The relay wakes on NOTIFY 'outbox' (the insert trigger)
and polls as a fallback.

Events go to their merchant's exchange (payments.events.<merchant>, declared before the
first one) without `mandatory`: with no queue bound (the merchant not listening) the broker
drops them, which loses nothing, since every event is
also visible by polling. A command must reach payments.work, so its publish is
mandatory and an unroutable command is an error.

Watching it: each row is published inside its own trace (the `traceparent` stored with it,
gateway.tracing); worker.metrics.RelayMetrics counts what was published and times the
confirms, and a periodic task reads the backlog (one query). gateway-relay serves them on
RELAY_METRICS_PORT (gateway.monitoring), with /healthz and /readyz.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass

import aio_pika
import aio_pika.exceptions
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from gateway import broker, config, db, logs, messages, monitoring, process, store, topology, tracing
from gateway.crashpoints import crash_point
from gateway.ops import rules
from worker import settings as wsettings
from worker.metrics import REFRESH_SECONDS, RelayMetrics

log = logs.get("relay")

PUBLISH_TIMEOUT = 30.0
# A host of DATABASE_URL that does not answer (a failed-over primary behind a dead route) must
# not hold the relay for asyncpg's default minute before it tries the next one.
LISTEN_CONNECT_TIMEOUT = 10.0
BUSY_SECONDS = 2.0  # after publishing, poll every BUSY_POLL_SECONDS for this long
BUSY_POLL_SECONDS = 0.01

# A publish that failed because of the row itself (returned as unroutable, nacked, or
# naming an exchange that does not exist): that row waits, the others go on.
_ROW_ERRORS = (
    aio_pika.exceptions.PublishError,
    aio_pika.exceptions.DeliveryError,
    aio_pika.exceptions.ChannelNotFoundEntity,
)


@dataclass(frozen=True)
class Batch:
    fetched: int
    published: int
    failed: int
    broker_trouble: bool  # a failure not caused by a row: stop and back off


class Relay:
    def __init__(
        self,
        database_url: str,
        amqp_url: str,
        cfg: wsettings.RelaySettings | None = None,
        ladder: tuple[int, ...] | None = None,
        *,
        db_timeouts: config.DbTimeouts = config.DEFAULT_DB_TIMEOUTS,
    ):
        self.database_url = database_url
        self.db_timeouts = db_timeouts
        self.amqp_url = amqp_url
        self.cfg = cfg or wsettings.RelaySettings()
        self.ladder = ladder or rules.parse_ladder(rules.DEFAULT_RETRY_LADDER)
        self.metrics = RelayMetrics()
        self.pool: asyncpg.Pool | None = None
        monitoring.pool_gauges(self.metrics.registry, lambda: self.pool)
        self._gauges: asyncio.Task | None = None
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._known_exchanges: set[str] = set()
        self.broker_trouble = False  # the last batch failed for a reason that is not a row's
        # outbox id -> (failures so far, monotonic time before which it is not retried)
        self._held_back: dict[int, tuple[int, float]] = {}

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self.pool = await db.create_pool(self.database_url, min_size=1, max_size=4, timeouts=self.db_timeouts)
        self.connection = await broker.connect_robust(
            self.amqp_url, client_properties={"connection_name": "gateway-relay"}
        )
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self._exchanges = dict(await topology.declare(self.channel, self.ladder))
        self._known_exchanges = set(self._exchanges) | {""}
        self._gauges = monitoring.refresh_every(REFRESH_SECONDS, self.refresh_gauges, "outbox gauges")

    async def close(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close(timeout=5)
        if self.connection is not None:
            await self.connection.close()
        if self.pool is not None:
            await self.pool.close()

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = await db.listen_connection(self.database_url, timeout=LISTEN_CONNECT_TIMEOUT)
        await self._listener.add_listener("outbox", lambda *_: self._wake.set())

    # ---- one batch ------------------------------------------------------------------------

    async def _exchange(self, name: str) -> AbstractExchange:
        """The exchange to publish to. A merchant's events exchange is declared the first time
        (it may be the merchant's first event); any other we did not declare is checked. Both on
        a throwaway channel: publishing to a missing exchange would close the shared channel
        and fail every other publish of the batch with it."""
        connection, channel = self._broker
        if name not in self._known_exchanges:
            probe = await connection.channel()
            try:
                if name.startswith(messages.EVENTS_EXCHANGE_PREFIX):
                    await topology.declare_events_exchange(probe, name)
                else:
                    await probe.declare_exchange(name, passive=True)
            finally:
                with contextlib.suppress(Exception):
                    await probe.close()  # also stops a robust channel from reopening itself
            self._known_exchanges.add(name)
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False) if name else channel.default_exchange
            self._exchanges[name] = exchange
        return exchange

    async def _publish(self, row: asyncpg.Record) -> None:
        headers = row["headers"] or {}
        with tracing.continued(headers, f"publish {row['exchange']}", tracing.SpanKind.PRODUCER):
            message = aio_pika.Message(
                body=bytes(row["body"]),
                # The row's trace (the publish span's, when spans are recorded); a row written
                # outside any trace (the sweeper's, ops replays) goes out with a new one.
                headers=tracing.inject(headers),
                message_id=row["message_id"],
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            exchange = await self._exchange(row["exchange"])
            started = time.perf_counter()
            await exchange.publish(
                message,
                routing_key=row["routing_key"],
                mandatory=not messages.is_events_exchange(row["exchange"]),
                timeout=PUBLISH_TIMEOUT,
            )
            self.metrics.published(row["exchange"], row["routing_key"], time.perf_counter() - started)
            log.debug(
                "outbox row published",
                outbox_id=row["id"],
                exchange=row["exchange"],
                routing_key=row["routing_key"],
                message_id=row["message_id"],
            )

    @property
    def _broker(self) -> tuple[AbstractRobustConnection, AbstractChannel]:
        if self.connection is None or self.channel is None:
            raise RuntimeError("the relay has not started")
        return self.connection, self.channel

    @property
    def _db(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("the relay is not started")
        return self.pool

    async def relay_batch(self) -> Batch:
        """Publish one batch of unsent rows."""
        async with self._db.acquire() as conn, conn.transaction():
            rows = await store.take_outbox_batch(conn, limit=self.cfg.batch_size, held_back=self._holding_back())
            if not rows:
                return Batch(0, 0, 0, False)
            results = await asyncio.gather(*(self._publish(r) for r in rows), return_exceptions=True)
            crash_point("relay.after_publish")
            confirmed = [r["id"] for r, res in zip(rows, results, strict=True) if not isinstance(res, BaseException)]
            failed = [(r, res) for r, res in zip(rows, results, strict=True) if isinstance(res, BaseException)]
            if failed:
                await store.restore_outbox_rows(conn, rows=[r for r, _ in failed])
        for row_id in confirmed:
            self._held_back.pop(row_id, None)
        broker_trouble = any(not isinstance(exc, _ROW_ERRORS) for _, exc in failed)
        for row, exc in failed:
            if not isinstance(exc, _ROW_ERRORS):
                continue  # not this row's fault: the whole relay backs off instead
            count = self._held_back.get(row["id"], (0, 0.0))[0] + 1
            self._held_back[row["id"]] = (count, time.monotonic() + min(60.0, 0.5 * 2 ** min(count, 8)))
        for row, exc in failed[:5]:
            log.error(
                "outbox publish failed",
                outbox_id=row["id"],
                exchange=row["exchange"],
                routing_key=row["routing_key"],
                error=type(exc).__name__,
                detail=str(exc)[:200],
            )
        return Batch(len(rows), len(confirmed), len(failed), broker_trouble)

    def _holding_back(self) -> list[int]:
        now = time.monotonic()
        for row_id in [r for r, (_, until) in self._held_back.items() if until < now - 600]:
            del self._held_back[row_id]  # long gone (another relay published it) or retried since
        return [row_id for row_id, (_, until) in self._held_back.items() if until > now]

    async def drain(self) -> tuple[int, int]:
        """Batches until the outbox has nothing more for us now: a batch finds nothing, or a
        batch that published something comes back short (it took every row it could see).

        An insert skips its NOTIFY while it sees an older row unsent (schema.sql:
        notify_outbox), counting on the relay to look once more. Ending at a short batch is
        safe because `run` looks again within BUSY_POLL_SECONDS of any publish (for
        BUSY_SECONDS): that look finds whatever landed during or after the batch, as an empty
        look here would, at most BUSY_POLL_SECONDS later; a busy pass saves a transaction
        (BEGIN, an empty DELETE, COMMIT). A batch that published nothing does not make `run`
        busy, so another look follows it here. And `run` polls every poll_seconds whatever
        happened: no row is left unsent.
        """
        total = failed_total = 0
        while True:
            batch = await self.relay_batch()
            total += batch.published
            failed_total += batch.failed
            self.broker_trouble = batch.broker_trouble
            if batch.broker_trouble or batch.fetched == 0:  # failed rows are held back: no spin
                return total, failed_total
            if batch.published and batch.fetched < self.cfg.batch_size:
                return total, failed_total

    async def refresh_gauges(self) -> None:
        backlog = await store.outbox_backlog(self._db)
        self.metrics.backlog(backlog["unsent"], backlog["oldest_seconds"])

    async def readiness(self) -> dict[str, bool]:
        """/readyz: the database answers and the broker connection is up."""
        return await monitoring.database_and_broker(self.pool, self.connection)

    # ---- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; survives broker and database outages with backoff."""
        failures = 0
        last_published = 0.0
        while not stop.is_set():
            self._wake.clear()
            try:
                await self._ensure_listener()
                published, failed = await self.drain()
                if published:
                    last_published = time.monotonic()
                    log.debug("published outbox rows", count=published)
                failures = failures + 1 if self.broker_trouble else 0
            except Exception as exc:  # the database or the broker is away: back off, try again
                failures += 1
                log.warning("relay pass failed", error=type(exc).__name__, detail=str(exc)[:200])
                if self._listener is not None and not self._listener.is_closed():
                    self._listener.terminate()
                self._listener = None
            if failures:
                delay = min(30.0, 0.5 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
                await _wait(stop, delay)
            else:
                # While traffic flows, inserts skip their NOTIFY (schema.sql: notify_outbox) when
                # they see older rows still unsent, so a row can land just after our last look
                # without waking us: poll briskly for a moment after any activity (drain counts
                # on it to end at a short batch).
                busy = time.monotonic() - last_published < BUSY_SECONDS
                await _wait_any(stop, self._wake, BUSY_POLL_SECONDS if busy else self.cfg.poll_seconds)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    tasks = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def serve(
    settings: config.Settings, cfg: wsettings.RelaySettings, stop: asyncio.Event, metrics_host: str
) -> None:
    relay = Relay(settings.database_url, settings.amqp_url, cfg, cfg.retry_ladder, db_timeouts=settings.db_timeouts)
    endpoint = monitoring.Endpoint(relay.metrics.registry, relay.readiness)
    if cfg.metrics_port:
        await endpoint.start(metrics_host, cfg.metrics_port)
        log.info("metrics and health served", host=metrics_host, port=cfg.metrics_port)
    try:
        await process.start_with_retries(relay.start, what="relay", stop=stop, undo=relay.close)
        if not stop.is_set():
            log.info("relay started", batch_size=cfg.batch_size, poll_seconds=cfg.poll_seconds)
            process.started()
            await relay.run(stop)
    finally:
        await relay.close()
        await endpoint.close()
        log.info("relay stopped")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway-relay",
        description="Publish the gateway's outbox (commands and events) to RabbitMQ, at least once.",
        epilog=config.epilog(
            config.Settings,
            wsettings.RelaySettings,
            unused=("BANK_URL", "GATEWAY_API_KEYS", "CARD_ENCRYPTION_KEY", "CARD_ENCRYPTION_KEYS"),
        ),
    )
    monitoring.add_host_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = config.load(uses_card_key=False)
    cfg = wsettings.RelaySettings.load()
    process.give_way(cfg.nice)
    logs.setup(settings.log_level, "gateway-relay")
    tracing.setup("gateway-relay")
    try:
        process.run(lambda stop: serve(settings, cfg, stop, args.metrics_host))
    except monitoring.ListenError as exc:
        print(f"gateway-relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
