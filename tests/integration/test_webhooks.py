"""Webhook delivery against a real PostgreSQL and a local receiver (development mode: a
loopback http URL): signatures, retries, the retry window, the failed list and resend,
rotation, redirects, disabled endpoints, the address rules at delivery time, and gatewayctl.

Events are written the way every phase writes them, as outbox rows (the trigger records them
and queues their deliveries); the deliverer is worker.webhook_delivery.Deliverer in-process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid

import orjson
import pytest

from gateway import messages, webhooks
from gateway.cards import SINGLE_KEY_ID, CardKey
from gateway.timefmt import now
from gateway.webhook_rules import EVENT_ID_HEADER, SIGNATURE_HEADER, SecretBox
from harness.procs import run_script
from tests.support.webhook_receiver import Receiver, verify
from worker.settings import WebhookSettings
from worker.webhook_delivery import CLAIM_ROUNDS, AddressRefused, Deliverer, GuardedResolver

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]

FAST = {"WEBHOOK_RETRY_BASE_SECONDS": "0.05", "WEBHOOK_RETRY_MAX_SECONDS": "0.2", "WEBHOOK_POLL_SECONDS": "0.05"}


@pytest.fixture(scope="module")
def box(card_key) -> SecretBox:
    return SecretBox([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))])


@contextlib.asynccontextmanager
async def delivering(pool, box, *, development: bool = True, **env: str):
    deliverer = Deliverer(pool, box, WebhookSettings.parse({**FAST, **env}), development=development)
    await deliverer.start()
    stop = asyncio.Event()
    task = asyncio.create_task(deliverer.run(stop))
    try:
        yield deliverer
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await deliverer.close()


@contextlib.asynccontextmanager
async def receiving(answer=lambda n, request: 200):
    receiver = Receiver(answer)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def events(pool, merchant: str, count: int) -> list[str]:
    """`count` events of `merchant`, each written to the outbox in a transaction of its own."""
    ids = []
    for n in range(count):
        event = messages.event("payment.authorized", {"id": f"pay_{n}"}, now(), merchant=merchant)
        await pool.execute(
            "INSERT INTO outbox (exchange, routing_key, message_id, body, headers) VALUES ($1, $2, $3, $4, $5)",
            event.exchange,
            event.routing_key,
            event.message_id,
            event.body,
            event.headers,
        )
        ids.append(event.message_id)
    return ids


async def until(check, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not (result := await check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return result


async def statuses(pool, event_ids: list[str]) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT e.event_id, d.status FROM events e JOIN webhook_deliveries d ON d.event_id = e.id "
        "WHERE e.event_id = ANY($1)",
        event_ids,
    )
    return {r["event_id"]: r["status"] for r in rows}


def merchant_name() -> str:
    return f"shop-{uuid.uuid4().hex[:8]}"


async def test_every_event_is_posted_signed_with_its_id_and_raw_body(pool, box):
    merchant = merchant_name()
    async with receiving() as receiver:
        endpoint = await webhooks.register(pool, box, merchant, receiver.url, development=True)
        assert endpoint.created and endpoint.secret.startswith("whsec_")
        ids = await events(pool, merchant, 3)
        async with delivering(pool, box):
            await until(lambda: _all(pool, ids, "delivered"))
    assert sorted(r.headers[EVENT_ID_HEADER] for r in receiver.received) == sorted(ids)
    for r in receiver.received:
        stored = await pool.fetchval("SELECT body FROM events WHERE event_id = $1", r.headers[EVENT_ID_HEADER])
        assert r.body == bytes(stored) and orjson.loads(r.body)["event_id"] == r.headers[EVENT_ID_HEADER]
        assert r.headers["Content-Type"] == "application/json"
        assert abs(verify(r.headers[SIGNATURE_HEADER], endpoint.secret, r.body) - time.time()) < 60
        with pytest.raises(AssertionError):
            verify(r.headers[SIGNATURE_HEADER], "whsec_wrong", r.body)


async def _all(pool, ids: list[str], status: str) -> bool:
    found = await statuses(pool, ids)
    return len(found) == len(ids) and set(found.values()) == {status}


async def test_refusals_are_retried_until_a_2xx(pool, box):
    merchant = merchant_name()
    async with receiving(lambda n, request: 503 if n < 3 else 204) as receiver:
        await webhooks.register(pool, box, merchant, receiver.url, development=True)
        (event_id,) = await events(pool, merchant, 1)
        async with delivering(pool, box):
            await until(lambda: _all(pool, [event_id], "delivered"))
    assert [r.status for r in receiver.received] == [503, 503, 503, 204]
    row = await pool.fetchrow(
        "SELECT d.* FROM webhook_deliveries d JOIN events e ON e.id = d.event_id WHERE e.event_id = $1", event_id
    )
    assert row["attempts"] == 4 and row["finished_at"] is not None


async def test_past_the_retry_window_a_delivery_fails_is_listed_and_resent(pool, box):
    merchant = merchant_name()
    healthy = False
    async with receiving(lambda n, request: 200 if healthy else 500) as receiver:
        await webhooks.register(pool, box, merchant, receiver.url, development=True)
        ids = await events(pool, merchant, 2)
        async with delivering(pool, box, WEBHOOK_RETRY_WINDOW_HOURS="0.0003"):  # about a second
            await until(lambda: _all(pool, ids, "failed"))
            failed = await webhooks.failed(pool, merchant)
            assert sorted(f["event_id"] for f in failed) == sorted(ids)
            assert all(f["last_error"] == "HTTP 500" and f["attempts"] >= 2 for f in failed)
            healthy = True
            assert await webhooks.resend(pool, [ids[0], f"evt_{uuid.uuid4().hex}"]) == [ids[0]]
            await until(lambda: _all(pool, ids[:1], "delivered"))
            assert await webhooks.resend_failed(pool, merchant) == 1
            await until(lambda: _all(pool, ids, "delivered"))
    assert await webhooks.failed(pool, merchant) == []
    assert {r.headers[EVENT_ID_HEADER] for r in receiver.accepted()} == set(ids)


async def test_while_a_secret_rotates_both_sign(pool, box):
    merchant = merchant_name()
    async with receiving() as receiver:
        first = await webhooks.register(pool, box, merchant, receiver.url, development=True)
        rotated = await webhooks.rotate(pool, box, merchant)
        assert rotated.secret != first.secret
        again = await webhooks.register(pool, box, merchant, receiver.url, development=True)
        assert again.secret == rotated.secret and not again.created  # set keeps the secret
        (event_id,) = await events(pool, merchant, 1)
        async with delivering(pool, box):
            await until(lambda: _all(pool, [event_id], "delivered"))
        header = receiver.received[0].headers[SIGNATURE_HEADER]
        assert header.count("v1=") == 2
        verify(header, rotated.secret, receiver.received[0].body)
        verify(header, first.secret, receiver.received[0].body)
        # The overlap over: the new secret alone.
        await pool.execute("UPDATE webhook_endpoints SET old_secret_until = now() WHERE merchant = $1", merchant)
        (later,) = await events(pool, merchant, 1)
        async with delivering(pool, box):
            await until(lambda: _all(pool, [later], "delivered"))
        header = receiver.received[1].headers[SIGNATURE_HEADER]
        assert header.count("v1=") == 1
        verify(header, rotated.secret, receiver.received[1].body)


async def test_a_slow_endpoint_with_a_backlog_does_not_hold_up_another(pool, box):
    slow, fast = merchant_name(), merchant_name()
    async with receiving() as quick:
        receiver = Receiver(delay=1.0)
        await receiver.start()
        try:
            await webhooks.register(pool, box, slow, receiver.url, development=True)
            await webhooks.register(pool, box, fast, quick.url, development=True)
            backlog = await events(pool, slow, 40)
            async with delivering(pool, box, WEBHOOK_ENDPOINT_CONCURRENCY="2"):
                await until(lambda: _started(receiver))
                started = time.monotonic()
                mine = await events(pool, fast, 3)
                await until(lambda: _all(pool, mine, "delivered"))
                assert time.monotonic() - started < 5  # not behind 40 s of the slow one's backlog
                claimed = await pool.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE merchant = $1 AND attempts > 0", slow
                )
                assert claimed <= 2 * 2 * CLAIM_ROUNDS  # what the slow one may hold: bounded, not its backlog
            assert len(receiver.received) < len(backlog)
        finally:
            await receiver.stop()


async def _started(receiver: Receiver) -> bool:
    return bool(receiver.received)


async def test_redirects_are_not_followed(pool, box):
    merchant = merchant_name()
    async with receiving(lambda n, request: 302) as receiver:
        await webhooks.register(pool, box, merchant, receiver.url, development=True)
        (event_id,) = await events(pool, merchant, 1)
        async with delivering(pool, box):
            await until(lambda: _error_of(pool, event_id))
        assert receiver.other_paths == []
    assert await _error_of(pool, event_id) == "HTTP 302"
    assert (await statuses(pool, [event_id]))[event_id] == "pending"


async def _error_of(pool, event_id: str) -> str | None:
    return await pool.fetchval(
        "SELECT d.last_error FROM webhook_deliveries d JOIN events e ON e.id = d.event_id WHERE e.event_id = $1",
        event_id,
    )


async def test_a_disabled_endpoint_gets_nothing(pool, box):
    merchant = merchant_name()
    async with receiving() as receiver:
        await webhooks.register(pool, box, merchant, receiver.url, development=True)
        waiting = await events(pool, merchant, 1)  # queued before the endpoint was disabled
        await webhooks.disable(pool, merchant)
        later = await events(pool, merchant, 1)
        async with delivering(pool, box):
            other = merchant_name()
            await webhooks.register(pool, box, other, receiver.url, development=True)
            marker = await events(pool, other, 1)
            await until(lambda: _all(pool, marker, "delivered"))  # the deliverer has been round
        assert [r.headers[EVENT_ID_HEADER] for r in receiver.received] == marker
        assert await statuses(pool, waiting + later) == {waiting[0]: "pending"}
        with pytest.raises(webhooks.NoEndpoint):
            await webhooks.disable(pool, merchant_name())


async def test_outside_development_loopback_and_private_addresses_are_not_called(pool, box):
    with pytest.raises(AddressRefused):
        await GuardedResolver(development=False).resolve("localhost", 443)
    assert await GuardedResolver(development=True).resolve("localhost", 443)
    deliverer = Deliverer(pool, box, WebhookSettings.parse(FAST), development=False)
    await deliverer.start()
    try:
        async with receiving() as receiver:
            delivery = {
                "url": receiver.url,
                "merchant": "ficmart",
                "secret": box.seal("ficmart", "whsec_x"),
                "old_secret": None,
                "old_secret_until": None,
                "now": now(),
                "event_id": "evt_1",
                "body": b"{}",
            }
            assert "must be https" in await deliverer.post(delivery)
            assert "not a public address" in await deliverer.post({**delivery, "url": "https://10.0.0.1/h"})
            assert receiver.received == []
    finally:
        await deliverer.close()


def gatewayctl(database_url: str, card_key: str, *args: str, development: bool = True):
    env = {
        "DATABASE_URL": database_url,
        "CARD_ENCRYPTION_KEY": card_key,
        "GATEWAY_ENV": "development" if development else "production",
        "LOG_LEVEL": None,
    }
    return run_script("gatewayctl", "webhooks", *args, env=env)


async def test_gatewayctl_manages_endpoints(pool, database_url, card_key, box):
    merchant = merchant_name()
    url = "http://127.0.0.1:9/hooks"
    done = await asyncio.to_thread(gatewayctl, database_url, card_key, "set", "--merchant", merchant, "--url", url)
    assert done.returncode == 0, done.stderr
    (secret_line,) = [line for line in done.stdout.splitlines() if line.startswith("secret=")]
    secret = secret_line.removeprefix("secret=")
    assert secret.startswith("whsec_")
    sealed = await pool.fetchval("SELECT secret FROM webhook_endpoints WHERE merchant = $1", merchant)
    assert secret.encode() not in bytes(sealed) and box.open(merchant, bytes(sealed)) == secret

    rotated = await asyncio.to_thread(gatewayctl, database_url, card_key, "rotate-secret", "--merchant", merchant)
    assert rotated.returncode == 0 and "secret=whsec_" in rotated.stdout and secret not in rotated.stdout
    listed = await asyncio.to_thread(gatewayctl, database_url, card_key, "list", "--json")
    (mine,) = [e for e in orjson.loads(listed.stdout) if e["merchant"] == merchant]
    assert mine["url"] == url and mine["enabled"] and mine["old_secret_until"]

    production_key = base64.b64encode(os.urandom(32)).decode()  # the tests' key is a published one
    refused = await asyncio.to_thread(
        gatewayctl, database_url, production_key, "set", "--merchant", merchant, "--url", url, development=False
    )
    assert refused.returncode == 2 and "must be https" in refused.stderr
    bad_name = await asyncio.to_thread(
        gatewayctl, database_url, card_key, "set", "--merchant", "Not A Name", "--url", url
    )
    assert bad_name.returncode == 2 and "caller name" in bad_name.stderr

    (event_id,) = await events(pool, merchant, 1)
    await pool.execute(
        "UPDATE webhook_deliveries d SET status = 'failed', last_error = 'HTTP 500', finished_at = now() "
        "FROM events e WHERE e.id = d.event_id AND e.event_id = $1",
        event_id,
    )
    failed = await asyncio.to_thread(gatewayctl, database_url, card_key, "failed", "--merchant", merchant)
    assert failed.returncode == 0 and event_id in failed.stdout and "HTTP 500" in failed.stdout
    resent = await asyncio.to_thread(gatewayctl, database_url, card_key, "resend", event_id, "evt_" + "0" * 32)
    assert resent.returncode == 1 and "not queued: evt_" in resent.stdout
    assert (await statuses(pool, [event_id]))[event_id] == "pending"

    off = await asyncio.to_thread(gatewayctl, database_url, card_key, "disable", "--merchant", merchant)
    assert off.returncode == 0
    assert not await pool.fetchval("SELECT enabled FROM webhook_endpoints WHERE merchant = $1", merchant)
