"""gateway-relay against the real PostgreSQL and RabbitMQ: at least once, never lost.

The module works in its own database and vhost so that it can reason about
the whole outbox (other modules leave rows of their own in the shared one).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from gateway import db
from gateway.messages import events_exchange
from harness import services
from worker import relay as relay_module
from worker import settings as wsettings
from worker.relay import Relay

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def relay_env(server_urls):
    admin_url, amqp_root = server_urls
    async with services.private_database(admin_url) as database_url:
        with services.private_vhost(amqp_root) as amqp_url:
            pool = await db.create_pool(database_url, min_size=1, max_size=5)
            broker = await aio_pika.connect_robust(amqp_url)
            yield database_url, amqp_url, pool, broker
            await broker.close()
            await pool.close()


@pytest.fixture
async def env(relay_env):
    database_url, amqp_url, pool, broker = relay_env
    await pool.execute("DELETE FROM outbox")
    yield relay_env


def make_relay(database_url: str, amqp_url: str, **kw) -> Relay:
    return Relay(database_url, amqp_url, wsettings.RelaySettings(**{"poll_seconds": 0.2, **kw}), ladder=(1, 2, 3))


@contextlib.asynccontextmanager
async def running_relay(database_url: str, amqp_url: str, **kw) -> AsyncIterator[Relay]:
    """A relay started and running its loop (Relay.run) until the block ends."""
    relay = make_relay(database_url, amqp_url, **kw)
    await relay.start()
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await task
        await relay.close()


async def bound_queue(broker, *, bind: bool = True):
    """A fresh topic exchange, and a queue bound to it with '#' (unless bind=False)."""
    channel = await broker.channel()
    name = f"test.relay.{uuid.uuid4().hex[:8]}"
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=False)
    queue = await channel.declare_queue(f"{name}.q", exclusive=True)
    if bind:
        await queue.bind(exchange, "#")
    return name, queue


async def insert_rows(pool, exchange: str, n: int) -> list[str]:
    ids = [f"msg_{uuid.uuid4().hex}" for _ in range(n)]
    await pool.executemany(
        "INSERT INTO outbox (exchange, routing_key, message_id, body) VALUES ($1, 'payment.test', $2, $3)",
        [(exchange, mid, b'{"n": %d}' % i) for i, mid in enumerate(ids)],
    )
    return ids


async def drain_queue(queue, *, expect: int | None = None, wait: float = 5.0) -> list:
    """Messages in the queue; with `expect`, waits up to `wait` s for that many, then a bit more."""
    got = []
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        msg = await queue.get(no_ack=True, fail=False)
        if msg is not None:
            got.append(msg)
            continue
        if expect is None or (len(got) >= expect and asyncio.get_running_loop().time() > deadline - wait + 0.3):
            return got
        if asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.05)


async def nacking_exchange(broker) -> str:
    """A fresh topic exchange whose only queue takes nothing (max length 0, reject-publish):
    the broker nacks every message routed to it."""
    channel = await broker.channel()
    name = f"test.relay.nack.{uuid.uuid4().hex[:8]}"
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=False)
    queue = await channel.declare_queue(
        f"{name}.q", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await queue.bind(exchange, "#")
    return name


def count_batches(relay: Relay) -> list[int]:
    """The rows each relay_batch call of `relay` fetched, from now on."""
    fetched: list[int] = []
    relay_batch = relay.relay_batch

    async def counting() -> relay_module.Batch:
        batch = await relay_batch()
        fetched.append(batch.fetched)
        return batch

    relay.relay_batch = counting  # type: ignore[method-assign]
    return fetched


async def unsent(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM outbox")


async def test_rows_published_once_with_properties_and_deleted(env):
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    ids = await insert_rows(pool, exchange, 450)
    relay = make_relay(database_url, amqp_url, batch_size=100)
    await relay.start()
    try:
        assert await relay.drain() == (450, 0)
        assert await relay.drain() == (0, 0)  # nothing left, nothing sent twice
    finally:
        await relay.close()
    got = await drain_queue(queue, expect=450)
    assert sorted(m.message_id for m in got) == sorted(ids)
    first = got[0]
    assert first.content_type == "application/json"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.routing_key == "payment.test"
    assert await unsent(pool) == 0


async def test_row_headers_and_its_trace_go_out_with_the_message(env):
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    await pool.execute(
        "INSERT INTO outbox (exchange, routing_key, message_id, body, headers)"
        " VALUES ($1, 'payment.test', 'msg_traced', '{}', $2), ($1, 'payment.test', 'msg_untraced', '{}', NULL)",
        exchange,
        {"merchant": "m_1", "traceparent": traceparent},
    )
    relay = make_relay(database_url, amqp_url)
    await relay.start()
    try:
        assert await relay.drain() == (2, 0)
    finally:
        await relay.close()
    got = {m.message_id: m for m in await drain_queue(queue, expect=2)}
    assert got["msg_traced"].headers == {"merchant": "m_1", "traceparent": traceparent}  # spans not recorded
    new = got["msg_untraced"].headers["traceparent"]  # a row outside any trace: a new one
    assert new.startswith("00-") and len(new) == 55 and new != traceparent


async def test_drain_ends_at_a_short_batch_that_published(env):
    """No empty look after a short batch that published: `run` polls again soon (busy)."""
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    await insert_rows(pool, exchange, 250)
    relay = make_relay(database_url, amqp_url, batch_size=100)
    await relay.start()
    fetched = count_batches(relay)
    try:
        assert await relay.drain() == (250, 0)
        assert fetched == [100, 100, 50]
        await insert_rows(pool, await nacking_exchange(broker), 2)  # a short batch publishing nothing...
        assert await relay.drain() == (0, 2)
        assert fetched[3:] == [2, 0]  # ...is followed by a look
    finally:
        await relay.close()
    await drain_queue(queue, expect=250)


async def test_a_row_whose_insert_skipped_its_notify_goes_out_before_the_poll(env):
    """An unsent row (here an unroutable one, held back) makes later inserts skip their
    NOTIFY; after publishing, the relay polls briskly and still finds them at once."""
    database_url, amqp_url, pool, broker = env
    unbound, _ = await bound_queue(broker, bind=False)
    exchange, queue = await bound_queue(broker)
    async with running_relay(database_url, amqp_url, poll_seconds=30):
        await asyncio.sleep(0.5)  # first pass done, now waiting on NOTIFY (the poll is 30 s)
        await pool.execute(
            "INSERT INTO outbox (exchange, routing_key, message_id, body)"
            " VALUES ($1, 'payment.test', 'msg_bad', '{}'), ($2, 'payment.test', 'msg_first', '{}')",
            unbound,
            exchange,
        )
        assert [m.message_id for m in await drain_queue(queue, expect=1, wait=5)] == ["msg_first"]
        for n in range(3):
            (mid,) = await insert_rows(pool, exchange, 1)  # msg_bad is older: no NOTIFY
            assert [m.message_id for m in await drain_queue(queue, expect=1, wait=1.5)] == [mid], n
    assert [r["message_id"] for r in await pool.fetch("SELECT message_id FROM outbox")] == ["msg_bad"]


async def test_notify_wakes_the_relay_before_the_poll(env):
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    async with running_relay(database_url, amqp_url, poll_seconds=30):
        await asyncio.sleep(0.5)  # first pass done, now waiting on NOTIFY (the poll is 30 s)
        (mid,) = await insert_rows(pool, exchange, 1)
        got = await drain_queue(queue, expect=1, wait=5)
        assert [m.message_id for m in got] == [mid]


async def test_unroutable_rows_stay_unsent(env):
    database_url, amqp_url, pool, broker = env
    exchange, _ = await bound_queue(broker, bind=False)  # the exchange exists, nothing is bound
    good_exchange, queue = await bound_queue(broker)
    bad = await insert_rows(pool, exchange, 3)
    good = await insert_rows(pool, good_exchange, 2)
    relay = make_relay(database_url, amqp_url)
    await relay.start()
    try:
        assert await relay.drain() == (2, 3)
        assert await relay.drain() == (0, 0)  # held back for a moment...
        relay._held_back = {k: (n, 0.0) for k, (n, _) in relay._held_back.items()}
        assert await relay.drain() == (0, 3)  # ...then retried: still returned, still unsent
    finally:
        await relay.close()
    rows = await pool.fetch("SELECT message_id FROM outbox")
    assert sorted(r["message_id"] for r in rows) == sorted(bad)
    assert sorted(m.message_id for m in await drain_queue(queue, expect=2)) == sorted(good)


async def test_a_bad_row_does_not_hold_up_the_rows_behind_it(env):
    database_url, amqp_url, pool, broker = env
    unbound, _ = await bound_queue(broker, bind=False)
    exchange, queue = await bound_queue(broker)
    bad = await insert_rows(pool, unbound, 1)
    missing = await insert_rows(pool, "no.such.exchange", 1)  # would close a shared channel
    good = await insert_rows(pool, exchange, 9)
    relay = make_relay(database_url, amqp_url, batch_size=2)
    await relay.start()
    try:
        published, failed = await relay.drain()
    finally:
        await relay.close()
    assert (published, failed) == (9, 2)
    assert sorted(m.message_id for m in await drain_queue(queue, expect=9)) == sorted(good)
    rows = await pool.fetch("SELECT message_id FROM outbox")
    assert sorted(r["message_id"] for r in rows) == sorted(bad + missing)


async def test_nacked_rows_stay_unsent_and_the_others_go_on(env):
    database_url, amqp_url, pool, broker = env
    nacking = await nacking_exchange(broker)
    exchange, queue = await bound_queue(broker)
    bad = await insert_rows(pool, nacking, 3)
    good = await insert_rows(pool, exchange, 2)
    relay = make_relay(database_url, amqp_url)
    await relay.start()
    try:
        assert await relay.drain() == (2, 3)
        assert not relay.broker_trouble  # the rows' own fault: held back, no backoff
        assert set(relay._held_back) == set(await pool.fetchval("SELECT array_agg(id) FROM outbox"))
    finally:
        await relay.close()
    rows = await pool.fetch("SELECT message_id FROM outbox")
    assert sorted(r["message_id"] for r in rows) == sorted(bad)
    assert sorted(m.message_id for m in await drain_queue(queue, expect=2)) == sorted(good)


async def test_broker_gone_leaves_rows_unsent(env):
    database_url, amqp_url, pool, broker = env
    exchange, _ = await bound_queue(broker)
    await insert_rows(pool, exchange, 5)
    relay = make_relay(database_url, amqp_url)
    await relay.start()
    await relay.connection.close()
    try:
        assert await relay.drain() == (0, 5)
    finally:
        await relay.close()
    assert await unsent(pool) == 5


async def test_two_relays_at_once_leave_nothing_unsent(env):
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    ids = await insert_rows(pool, exchange, 3000)
    relays = [make_relay(database_url, amqp_url, batch_size=100) for _ in range(2)]
    for r in relays:
        await r.start()
    try:
        results = await asyncio.gather(*(r.drain() for r in relays))
        # Each drain stops at its first short batch; finish what either may have left behind.
        results.append(await relays[0].drain())
    finally:
        for r in relays:
            await r.close()
    assert sum(p for p, _ in results) == 3000 and all(f == 0 for _, f in results)
    assert all(p > 0 for p, _ in results[:2]), "both relays should have taken a share"
    got = await drain_queue(queue, expect=3000, wait=10)
    assert set(m.message_id for m in got) == set(ids)  # at least once each
    assert len(got) == 3000  # SKIP LOCKED: and here exactly once
    assert await unsent(pool) == 0


async def test_crash_between_publish_and_commit_publishes_again(env, monkeypatch):
    """The broker confirmed the batch, then the relay dies before its transaction commits:
    the rows are still there and go out again (at least once, never lost)."""
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    ids = await insert_rows(pool, exchange, 10)

    def crash(point: str) -> None:
        if point == "relay.after_publish":
            raise ConnectionResetError("crash between publish and commit")

    crashing = make_relay(database_url, amqp_url)
    await crashing.start()
    monkeypatch.setattr(relay_module, "crash_point", crash)
    try:
        with pytest.raises(ConnectionResetError):
            await crashing.relay_batch()
    finally:
        monkeypatch.undo()
        await crashing.close()
    assert await unsent(pool) == 10  # the transaction rolled back: nothing deleted
    first = await drain_queue(queue, expect=10)
    assert sorted(m.message_id for m in first) == sorted(ids)

    relay = make_relay(database_url, amqp_url)
    await relay.start()
    try:
        assert await relay.drain() == (10, 0)
    finally:
        await relay.close()
    second = await drain_queue(queue, expect=10)
    assert sorted(m.message_id for m in second) == sorted(ids)  # again: at least once, never lost
    assert await unsent(pool) == 0


async def test_run_survives_a_broker_outage(env):
    """connect_robust reconnects; rows inserted during the outage go out afterwards."""
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    async with running_relay(database_url, amqp_url) as relay:
        # Drop the relay's connection from the broker's side, as a restart would.
        await relay.connection.transport.connection.close()  # type: ignore[union-attr]
        ids = await insert_rows(pool, exchange, 20)
        got = await drain_queue(queue, expect=20, wait=30)
        assert set(ids) <= {m.message_id for m in got}
    assert await unsent(pool) == 0


async def test_events_with_nobody_listening_are_published_and_dropped(env):
    """An event's publish is not mandatory: with no queue bound it is confirmed and gone
    (every event is also visible by polling), while a command must reach a queue."""
    database_url, amqp_url, pool, broker = env
    relay = make_relay(database_url, amqp_url)
    await relay.start()
    try:
        await insert_rows(pool, events_exchange("nobody-listens"), 3)  # declared by the relay, nothing bound
        assert await relay.drain() == (3, 0)
    finally:
        await relay.close()
    assert await unsent(pool) == 0


async def test_events_left_for_the_shared_exchange_go_to_their_merchants_after_migrate(env):
    """An earlier version sent every merchant's events to payments.events: rows it left unsent
    move to their merchant's exchange (named by the header, else the body) when schema.sql runs."""
    database_url, amqp_url, pool, broker = env
    await pool.executemany(
        "INSERT INTO outbox (exchange, routing_key, message_id, body, headers)"
        " VALUES ('payments.events', 'payment.captured', $1, $2, $3)",
        [
            ("evt_old_1", b'{"merchant": "ficmart", "payment": {}}', {"merchant": "ficmart"}),
            ("evt_old_2", b'{"merchant": "other", "payment": {}}', None),
        ],
    )
    await db.migrate(database_url)
    rows = {r["message_id"]: r["exchange"] for r in await pool.fetch("SELECT message_id, exchange FROM outbox")}
    assert rows == {"evt_old_1": "payments.events.ficmart", "evt_old_2": "payments.events.other"}
    relay = make_relay(database_url, amqp_url)
    await relay.start()
    try:
        assert await relay.drain() == (2, 0)
    finally:
        await relay.close()


async def test_backlog_gauges_and_readiness(env):
    database_url, amqp_url, pool, broker = env
    exchange, queue = await bound_queue(broker)
    relay = make_relay(database_url, amqp_url)
    registry = relay.metrics.registry

    def gauges() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("gateway_outbox_unsent"),
            registry.get_sample_value("gateway_outbox_oldest_unsent_seconds"),
        )

    assert await relay.readiness() == {"database": False, "broker": False}
    await relay.start()
    try:
        assert await relay.readiness() == {"database": True, "broker": True}
        await insert_rows(pool, exchange, 3)
        await pool.execute(
            "UPDATE outbox SET created_at = now() - interval '90 seconds' WHERE id = (SELECT min(id) FROM outbox)"
        )
        await relay.refresh_gauges()
        unsent, oldest = gauges()
        assert unsent == 3 and 90 <= oldest < 120
        assert await relay.drain() == (3, 0)
        await relay.refresh_gauges()
        assert gauges() == (0, 0)
        assert registry.get_sample_value("gateway_relay_published_total", {"exchange": exchange}) == 3
        assert registry.get_sample_value("gateway_relay_confirm_seconds_count") == 3
    finally:
        await relay.close()
    await drain_queue(queue, expect=3)
