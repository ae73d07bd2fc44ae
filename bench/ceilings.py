"""Ceilings: what PostgreSQL and RabbitMQ do on this machine without the gateway around them.

PostgreSQL (in a throwaway database with the gateway's schema, triggers included):
  same_sql  - the API's submit of one request, run directly: store.submit_authorizations,
              one autocommit statement (advisory lock, key lookup, six INSERTs), exactly
              as gateway.payments.intake.submit_many does (same pool size, same concurrency);
  naive     - for reference, four separate INSERTs (idempotency key, payment,
              history, outbox) in one transaction;
  same_sql_no_notify - diagnostic: same_sql with the outbox NOTIFY trigger dropped
              (a committing transaction that has NOTIFYed takes a database-wide
              lock, so such commits are serialised).
RabbitMQ (on a throwaway quorum queue in the private vhost, persistent messages):
  publish   - publisher confirms, 200 publishes outstanding (the relay's batch size);
  consume   - prefetch 1000 (the worker's), one ack per message (as the worker does).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from dataclasses import dataclass

import aio_pika
import asyncpg
import orjson

from bench.util import pcts
from gateway import db, messages, store
from gateway.cards import CardKey, CardVault
from gateway.domain import Payment
from gateway.fingerprints import Fingerprinter
from gateway.payments.intake import IdempotentRequest
from gateway.payments.operations import bank_key
from gateway.timefmt import now
from gateway.views import receipt
from harness import services


@dataclass
class Ceiling:
    name: str
    ops: int
    seconds: float
    latency_ms: dict[float, float] | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else float("nan")


NAIVE = (
    """INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status,
                                     response_body, location, created_at)
       VALUES ($1, $2, 'POST', '/v1/payments', $3, 202, $4, $5, $6)""",
    """INSERT INTO payments (id, merchant, order_id, customer_id, amount, currency, status, card_brand,
                             card_last4, card_expiry_month, card_expiry_year, created_at, updated_at)
       VALUES ($1, $2, $3, $4, $5, 'USD', 'pending', $6, $7, $8, $9, $10, $10)""",
    "INSERT INTO payment_history (payment_id, status, cause, at) VALUES ($1, 'pending', 'api:authorize', $2)",
    "INSERT INTO outbox (exchange, routing_key, message_id, body) VALUES ($1, $2, $3, $4)",
)


class Template:
    """Realistic parameter values (sizes as the API writes them); only the ids vary per call."""

    def __init__(self) -> None:
        vault = CardVault([CardKey("bench", os.urandom(32))])
        self.sealed = vault.seal("pay_" + "0" * 32, "4000000000000002", "123")
        payment = Payment.pending(
            id="pay_" + "0" * 32,
            order_id="ord_" + "0" * 40,
            customer_id="cus_ceiling",
            amount=5000,
            card_brand="visa",
            card_last4="0002",
            card_expiry_month=12,
            card_expiry_year=2035,
            at=now(),
        )
        self.body = orjson.dumps(receipt(payment))
        self.request_body = orjson.dumps(
            {
                "order_id": payment.order_id,
                "customer_id": "cus_ceiling",
                "amount": 5000,
                "currency": "USD",
                "card": {"number": "4000000000000002", "cvv": "123", "expiry_month": 12, "expiry_year": 2035},
            }
        )
        self.fingerprinter = Fingerprinter([os.urandom(32)])
        self.run = uuid.uuid4().hex[:8]

    async def same_sql(self, pool: asyncpg.Pool) -> asyncpg.Record:
        """The statement gateway.payments.intake.submit_many sends, with fresh ids."""
        return (await store.submit_authorizations(pool, submissions=[self.submission()]))[0]

    def submission(self) -> store.Submission:
        """One authorize request as the API records it, with fresh ids."""
        pid, op = messages.new_id("pay"), messages.new_id("op")
        key = f"ceil-{uuid.uuid4().hex}"
        req = IdempotentRequest(
            "ceiling", key, "POST", "/v1/payments", self.fingerprinter.of("POST", "/v1/payments", self.request_body)
        )
        return store.Submission(
            payment_id=pid,
            order_id=f"ord_{key}",
            customer_id="cus_ceiling",
            amount=5000,
            card_brand="visa",
            card_last4="0002",
            card_expiry_month=12,
            card_expiry_year=2035,
            at=now(),
            operation_id=op,
            bank_key=bank_key(op),
            sealed_card=self.sealed,
            command=messages.command(op, "authorize"),
            reply=store.StoredReply(request=req, body=self.body, location=f"/v1/payments/{pid}"),
        )

    def naive(self, i: int) -> tuple[tuple, ...]:
        pid = messages.new_id("pay")
        key = f"naive-{self.run}-{i}"
        cmd = messages.command(messages.new_id("op"), "authorize")
        at = now()
        return (
            ("ceiling", key, "f" * 64, self.body, f"/v1/payments/{pid}", at),
            (pid, "ceiling", f"ord_{key}", "cus_ceiling", 5000, "visa", "0002", 12, 2035, at),
            (pid, at),
            (cmd.exchange, cmd.routing_key, cmd.message_id, cmd.body),
        )


async def _noop_reset(_conn: asyncpg.Connection) -> None:
    """As the API's pool: no reset query when a connection goes back to the pool."""


async def _slice(
    pool: asyncpg.Pool, body, counter, concurrency: int, warmup: float, seconds: float
) -> tuple[int, list[float]]:
    """`concurrency` clients for warmup + seconds; completions and latencies of the last `seconds`."""
    latencies: list[float] = []
    t0 = time.perf_counter()
    t_w, t_e = t0 + warmup, t0 + warmup + seconds

    async def client() -> None:
        while (start := time.perf_counter()) < t_e:
            await body(pool, next(counter))
            end = time.perf_counter()
            if t_w <= end <= t_e:
                latencies.append((end - start) * 1000)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies), latencies


async def postgres(
    admin_url: str, *, concurrency: int, pool_size: int, warmup: float, seconds: float, rounds: int = 4
) -> list[Ceiling]:
    """Each variant runs `rounds` slices of seconds/rounds, interleaved round-robin, so that a
    noisy neighbour's burst hits every variant alike; the figure is the median slice rate."""
    template = Template()

    async def same_sql(pool: asyncpg.Pool, i: int) -> None:
        row = await template.same_sql(pool)
        assert row["locked"] and row["inserted"], row

    async def naive(pool: asyncpg.Pool, i: int) -> None:
        params = template.naive(i)
        async with pool.acquire() as conn, conn.transaction():
            for sql, args in zip(NAIVE, params, strict=True):
                await conn.execute(sql, *args)

    dsn = await services.create_database(admin_url)
    pool = None
    try:
        await db.migrate(dsn)
        # One pool (connections are scarce on a shared server); the no-NOTIFY variant runs with
        # the trigger disabled for its slices only.
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size, reset=_noop_reset)
        variants = {
            "pg_same_sql": (True, same_sql),
            "pg_naive_4rt": (True, naive),
            "pg_same_sql_no_notify": (False, same_sql),
        }
        counter = itertools.count()
        slice_s = seconds / rounds
        rates: dict[str, list[float]] = {name: [] for name in variants}
        latencies: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            for name, (notify, body) in variants.items():
                if not notify:
                    await pool.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_inserted")
                try:
                    done, lat = await _slice(
                        pool, body, counter, concurrency, warmup if r == 0 else min(0.2, warmup), slice_s
                    )
                finally:
                    if not notify:
                        await pool.execute("ALTER TABLE outbox ENABLE TRIGGER outbox_inserted")
                rates[name].append(done / slice_s)
                latencies[name] += lat
        results = []
        for name in variants:
            ordered = sorted(rates[name])
            n = len(ordered)
            median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
            spread = f"; slices {ordered[0]:,.0f}-{ordered[-1]:,.0f}/s" if n > 1 else ""
            results.append(
                Ceiling(
                    name,
                    round(median * seconds),
                    seconds,
                    pcts(latencies[name]),
                    f"{concurrency} conc., pool {pool_size}{spread}",
                )
            )
        return results
    finally:
        if pool is not None:
            await pool.close()
        await services.drop_database(admin_url, dsn)


async def rabbitmq(amqp_url: str, *, seconds: float, window: int = 200, prefetch: int = 1000) -> list[Ceiling]:
    connection = await aio_pika.connect(amqp_url)
    name = f"bench.ceiling.{uuid.uuid4().hex[:8]}"
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        body = orjson.dumps({"operation_id": messages.new_id("op")})
        published = 0
        latencies: list[float] = []
        t_e = time.perf_counter() + seconds

        async def publisher() -> None:
            nonlocal published
            while (start := time.perf_counter()) < t_e:
                message = aio_pika.Message(
                    body=body,
                    message_id=messages.new_id("cmd"),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(message, routing_key=name, mandatory=True, timeout=30)
                published += 1
                latencies.append((time.perf_counter() - start) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(window)))
        publish = Ceiling(
            "rabbit_publish_confirm",
            published,
            time.perf_counter() - t0,
            pcts(latencies),
            f"{window} unconfirmed at most",
        )

        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        cqueue = await consume_channel.declare_queue(name, passive=True)
        consumed = 0
        all_in = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal consumed
            await message.ack()
            consumed += 1
            if consumed >= published:
                all_in.set()

        t0 = time.perf_counter()
        tag = await cqueue.consume(on_message)
        try:
            await asyncio.wait_for(all_in.wait(), timeout=max(30.0, seconds * 10))
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
        await cqueue.cancel(tag)
        consume = Ceiling("rabbit_consume_ack", consumed, elapsed, None, f"prefetch {prefetch}, one ack per message")
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
    return [publish, consume]
