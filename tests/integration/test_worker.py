"""The whole asynchronous path against a REAL mock bank process:

    intake (authorize, request_actions) -> outbox -> relay -> payments.work -> worker
    -> mockbank -> settlement (record_many) -> outbox (event)

The relay and the worker run in this process (short retry ladder 1,2,3 s);
the bank is the `mockbank` console script, driven through its /_mock API
(harness/mockbank_client.py). The module has its own database, vhost and
bank, from the system harness (harness/system.py) with no gateway
process; one test starts gateway-relay and gateway-worker through it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable

import aio_pika
import aiohttp
import orjson
import pytest

from gateway import config, db, topology
from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.domain import Action
from gateway.messages import COMMANDS_EXCHANGE, events_exchange
from gateway.payments import intake, settlement
from harness.system import System
from tests.support import factories, phases
from worker import settings as wsettings
from worker.breaker import State
from worker.consumer import Worker
from worker.relay import Relay

pytestmark = pytest.mark.timeout(180)

HAPPY = ("4111111111111111", "123", 12, 2030)
NO_FUNDS = ("5555555555554444", "789", 9, 2030)
EXPIRED = ("5105105105105100", "321", 3, 2030)  # the bank's stored expiry is 03/2020

WORKER_CFG = wsettings.WorkerSettings(
    bank_timeout=3,
    prefetch=200,
    concurrency=100,
    db_pool_size=10,
    retry_ladder=(1, 2, 3),
    quick_retries=3,
    quick_retry_base=0.05,
    lease_margin=2,
    confirm_delay=0.2,
    sweep_interval=0.5,
    stuck_after=1,
    sweep_batch=100,
)


# The console scripts of the last test get the same retry ladder as the in-process worker.
SCRIPT_ENV = {"WORKER_RETRY_LADDER": "1,2,3", "BANK_TIMEOUT_SECONDS": "5", "LOG_LEVEL": "info"}


class Pipeline:
    def __init__(self, system: System, card_key: str, pool, broker):
        self.system = system
        self.database_url, self.amqp_url, self.bank_url = system.database_url, system.amqp_url, system.bank_url
        self.vhost = system.vhost
        self.bank = system.bank
        self.pool, self.broker = pool, broker
        self.settings = config.parse(
            {
                "DATABASE_URL": self.database_url,
                "AMQP_URL": self.amqp_url,
                "BANK_URL": self.bank_url,
                "CARD_ENCRYPTION_KEY": card_key,
                "GATEWAY_ENV": "development",
            },
            uses_card_key=True,
        )
        self.vault = CardVault([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))])
        self.http = aiohttp.ClientSession()
        self.worker: Worker | None = None
        self.relay: Relay | None = None
        self._relay_stop = asyncio.Event()
        self._relay_task: asyncio.Task | None = None
        self._published: list[tuple[str, dict]] = []  # (routing key, body) of every event, as received

    async def start(self) -> None:
        # Every event the relay publishes (it deletes the outbox rows once confirmed).
        channel = await self.broker.channel()
        events = await channel.declare_exchange(events_exchange("ficmart"), aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(events, routing_key="#")

        async def received(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self._published.append((message.routing_key or "", orjson.loads(message.body)))
            await message.ack()

        await queue.consume(received)
        self.relay = Relay(
            self.database_url, self.amqp_url, wsettings.RelaySettings(poll_seconds=0.2), ladder=WORKER_CFG.retry_ladder
        )
        await self.relay.start()
        self.resume_relay()
        await self.start_worker()

    async def start_worker(self) -> None:
        self.worker = Worker(self.settings, WORKER_CFG)
        await self.worker.start()

    def resume_relay(self) -> None:
        self._relay_stop = asyncio.Event()
        self._relay_task = asyncio.create_task(self.relay.run(self._relay_stop))

    async def pause_relay(self) -> None:
        self._relay_stop.set()
        await self._relay_task

    @contextlib.asynccontextmanager
    async def relay_paused(self):
        await self.pause_relay()
        try:
            yield
        finally:
            self.resume_relay()

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await self.pause_relay()
        await self.relay.close()
        await self.http.close()

    # ---- the API side, without HTTP ------------------------------------------------------

    async def authorize(self, card=HAPPY, amount: int = 1500) -> str:
        number, cvv, month, year = card
        req = factories.request(body=uuid.uuid4().bytes)
        resp = await phases.authorize(
            self.pool,
            self.vault,
            req,
            order_id=f"ord_{uuid.uuid4().hex[:10]}",
            customer_id="cus_1",
            amount=amount,
            card=intake.CardInput(number, cvv, month, year),
        )
        return orjson.loads(resp.body)["id"]

    async def request(self, payment_id: str, action: Action) -> None:
        req = factories.request(f"/v1/payments/{payment_id}/{action.value}")
        await phases.request_action(self.pool, req, payment_id, action, None)

    async def wait(self, payment_id: str, until, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            row = dict(await self.pool.fetchrow("SELECT * FROM payments WHERE id = $1", payment_id))
            if until(row):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"payment never reached the expected state: {row}")
            await asyncio.sleep(0.05)

    async def wait_status(self, payment_id: str, status: str, timeout: float = 30.0) -> dict:
        return await self.wait(payment_id, lambda r: r["status"] == status, timeout)

    async def operation(self, payment_id: str, kind: str) -> dict:
        return dict(
            await self.pool.fetchrow(
                "SELECT * FROM operations WHERE payment_id = $1 AND kind = $2 ORDER BY created_at DESC LIMIT 1",
                payment_id,
                kind,
            )
        )

    async def events(self, payment_id: str) -> list[str]:
        """Routing keys of the payment's events: published (received from payments.events.ficmart) and
        still in the outbox, oldest first."""
        rows = await self.pool.fetch(
            "SELECT routing_key, message_id FROM outbox WHERE exchange LIKE 'payments.events.%'"
            " AND convert_from(body, 'UTF8')::jsonb #>> '{payment,id}' = $1 ORDER BY id",
            payment_id,
        )
        await asyncio.sleep(0.3)  # a publish confirmed a moment ago is on its way to our queue
        seen = [(key, body["event_id"]) for key, body in self._published if body["payment"]["id"] == payment_id]
        published = {event_id for _, event_id in seen}
        return [key for key, _ in seen] + [r["routing_key"] for r in rows if r["message_id"] not in published]

    # ---- the bank (its /_mock API: self.bank) ---------------------------------------------

    async def bank_entries(self, section: str, key: str) -> list[dict]:
        return [e for e in (await self.bank.ledger())[section] if e["idempotency_key"] == key]

    async def bank_post(self, path: str, key: str, body: dict) -> tuple[int, dict]:
        async with self.http.post(f"{self.bank_url}{path}", json=body, headers={"Idempotency-Key": key}) as resp:
            return resp.status, await resp.json()

    # ---- the broker -------------------------------------------------------------------------

    async def dead_letters(self, operation_id: str | None, wait: float = 5.0, match=None) -> list:
        """Messages for this operation (or matching `match`) in payments.dead; others are put back."""
        match = match or (lambda msg: (msg.headers or {}).get("operation_id") == operation_id)
        channel = await self.broker.channel()
        queue = await channel.declare_queue(topology.DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        found, deadline = [], time.monotonic() + wait
        while not found and time.monotonic() < deadline:
            others = []
            while (msg := await queue.get(no_ack=False, fail=False)) is not None:
                if match(msg):
                    found.append(msg)
                    await msg.ack()
                else:
                    others.append(msg)
            for msg in others:
                await msg.nack(requeue=True)
            if not found:
                await asyncio.sleep(0.2)
        await channel.close()
        return found

    async def replay(self, operation_id: str, kind: str, *, force: bool = False) -> None:
        """What ops replay does: unpark (forced if asked), then send the command again."""
        assert await settlement.unpark(self.pool, operation_id, forced=force)
        await self.send_command(orjson.dumps({"operation_id": operation_id}), kind)

    async def send_command(self, body: bytes, kind: str, headers: dict | None = None) -> None:
        channel = await self.broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(body, headers=headers or {}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=kind,
        )
        await channel.close()


@pytest.fixture(scope="module")
async def pipeline(server_urls, card_key):
    bank_env = {
        "MIN_LATENCY_MS": "5",
        "MAX_LATENCY_MS": "30",
        "FAILURE_RATE": "0",
        "RESPONSE_LOSS_RATE": "0",
        "LOG_LEVEL": "warning",
    }
    no_gateway = {"api": 0, "relay": 0, "worker": 0}  # the relay and worker run in this process
    async with System(server_urls, card_key, scale=no_gateway, bank_env=bank_env, gateway_env=SCRIPT_ENV) as system:
        pool = await db.create_pool(system.database_url, min_size=1, max_size=10)
        broker = await aio_pika.connect_robust(system.amqp_url)
        pipe = Pipeline(system, card_key, pool, broker)
        try:
            await pipe.start()
            yield pipe
        finally:
            await pipe.close()
            await broker.close()
            await pool.close()


@pytest.fixture
async def pipe(pipeline):
    await pipeline.bank.reset()
    yield pipeline


# ---- the happy path ---------------------------------------------------------------------------


async def test_authorize_records_the_hold_emits_the_event_and_forgets_the_card(pipe):
    pid = await pipe.authorize(amount=2500)
    row = await pipe.wait_status(pid, "authorized")
    assert row["authorization_id"].startswith("auth_") and row["authorization_expires_at"] is not None
    assert row["last_error"] is None and not row["attention_required"]
    assert await pipe.events(pid) == ["payment.authorized"]
    assert await pipe.pool.fetchval("SELECT count(*) FROM card_vault WHERE payment_id = $1", pid) == 0
    op = await pipe.operation(pid, "authorize")
    assert op["status"] == "succeeded" and op["lease_owner"] is None and op["bank_ms"] > 0
    (hold,) = await pipe.bank_entries("authorizations", op["bank_key"])
    assert (hold["authorization_id"], hold["amount"], hold["status"]) == (row["authorization_id"], 2500, "open")


@pytest.mark.parametrize("card, code", [(NO_FUNDS, "insufficient_funds"), (EXPIRED, "card_expired")])
async def test_declines(pipe, card, code):
    pid = await pipe.authorize(card=card)
    row = await pipe.wait_status(pid, "declined")
    assert row["last_error"]["code"] == code and row["last_error"]["retryable"] is False
    assert await pipe.events(pid) == ["payment.declined"]
    assert await pipe.pool.fetchval("SELECT count(*) FROM card_vault WHERE payment_id = $1", pid) == 0
    assert (await pipe.bank.ledger())["authorizations"] == []


async def test_capture_then_refund_and_void(pipe):
    pid = await pipe.authorize(amount=700)
    await pipe.wait_status(pid, "authorized")
    await pipe.request(pid, Action.CAPTURE)
    row = await pipe.wait_status(pid, "captured")
    assert row["capture_id"].startswith("cap_")
    await pipe.request(pid, Action.REFUND)
    row = await pipe.wait_status(pid, "refunded")
    assert row["refund_id"].startswith("ref_")
    assert await pipe.events(pid) == ["payment.authorized", "payment.captured", "payment.refunded"]

    other = await pipe.authorize(amount=300)
    await pipe.wait_status(other, "authorized")
    await pipe.request(other, Action.VOID)
    row = await pipe.wait_status(other, "voided")
    assert row["void_id"].startswith("void_")

    refunded = await pipe.wait_status(pid, "refunded")
    ledger = await pipe.bank.ledger()
    assert [(c["capture_id"], c["refund_id"]) for c in ledger["captures"]] == [
        (refunded["capture_id"], refunded["refund_id"])
    ]
    assert [v["authorization_id"] for v in ledger["voids"]] == [row["authorization_id"]]
    assert await pipe.events(other) == ["payment.authorized", "payment.voided"]


# ---- the bank misbehaves -------------------------------------------------------------------------


async def test_lost_responses_still_give_exactly_one_hold_and_one_capture(pipe):
    await pipe.bank.chaos(response_loss_rate=1.0)
    pid = await pipe.authorize(amount=900)
    await pipe.wait_status(pid, "authorized")
    await pipe.request(pid, Action.CAPTURE)
    await pipe.wait_status(pid, "captured")
    auth_key = (await pipe.operation(pid, "authorize"))["bank_key"]
    cap_key = (await pipe.operation(pid, "capture"))["bank_key"]
    ledger = await pipe.bank.ledger()
    assert len([a for a in ledger["authorizations"] if a["idempotency_key"] == auth_key]) == 1
    assert len(ledger["authorizations"]) == 1 and len(ledger["captures"]) == 1
    assert ledger["captures"][0]["idempotency_key"] == cap_key
    assert ledger["stats"]["lost_responses"] >= 2 and ledger["stats"]["replays"] >= 2
    held = next(a for a in ledger["accounts"] if a["card_last4"] == "1111")
    assert held["balance"] == 1_000_000 - 900 and held["held"] == 0


async def test_high_failure_rate_is_retried_to_success(pipe):
    await pipe.bank.chaos(failure_rate=0.4)
    pids = [await pipe.authorize(amount=100 + i) for i in range(8)]
    for pid in pids:
        await pipe.wait_status(pid, "authorized", timeout=60)
        await pipe.request(pid, Action.CAPTURE)
    for pid in pids:
        await pipe.wait_status(pid, "captured", timeout=60)
    ledger = await pipe.bank.ledger()
    assert len(ledger["authorizations"]) == 8 and len(ledger["captures"]) == 8
    assert ledger["stats"]["injected_failures"] > 0
    retried = await pipe.pool.fetchval(
        "SELECT count(*) FROM operations WHERE payment_id = ANY($1) AND attempts > 1", pids
    )
    assert retried > 0


async def test_failures_past_the_ladder_park_for_ops_then_replay_works(pipe):
    """The bank is up but keeps failing this one operation (500s): parked after the ladder."""
    await pipe.bank.arm_fault(action="error", path="/api/v1/authorizations", method="POST", status=500, times=1000)
    pid = await pipe.authorize(amount=400)
    row = await pipe.wait(pid, lambda r: r["attention_required"], timeout=60)
    assert row["status"] == "pending"
    assert row["last_error"]["code"] == "internal_error" and row["last_error"]["retryable"] is True
    assert await pipe.events(pid) == ["payment.attention_required"]
    op = await pipe.operation(pid, "authorize")
    assert op["parked"] and op["status"] == "pending" and op["lease_owner"] is None
    assert op["attempts"] == WORKER_CFG.quick_retries * (len(WORKER_CFG.retry_ladder) + 1)
    (dead,) = await pipe.dead_letters(op["id"])
    headers = dead.headers
    assert headers["payment_id"] == pid and headers["kind"] == "authorize"
    assert headers["attempts"] == op["attempts"] and op["rungs"] == 3
    assert orjson.loads(headers["last_error"])["code"] == "internal_error"
    assert orjson.loads(dead.body) == {"operation_id": op["id"]}
    assert not pipe.worker.breaker.is_open  # one operation's failures say nothing about the bank

    await pipe.bank.clear_faults()
    await pipe.replay(op["id"], "authorize")
    row = await pipe.wait_status(pid, "authorized")
    assert not row["attention_required"] and row["last_error"] is None
    assert len(await pipe.bank_entries("authorizations", op["bank_key"])) == 1


async def test_bank_down_longer_than_the_ladder_is_waited_out_not_parked(pipe):
    """One operation alone cannot open the breaker, but before parking it the worker asks the
    bank's /health: down, so the breaker opens and the operation waits for the bank."""
    await pipe.bank.chaos(down=True)
    try:
        pid = await pipe.authorize(amount=450)
        await asyncio.sleep(10)  # three quick tries, rungs of 1, 2 and 3 s: well past the ladder
        row = await pipe.pool.fetchrow("SELECT status, attention_required FROM payments WHERE id = $1", pid)
        assert (row["status"], row["attention_required"]) == ("pending", False)
        op = await pipe.operation(pid, "authorize")
        assert not op["parked"] and op["lease_owner"] is None
        assert pipe.worker.breaker.is_open
        # ...and says so where the ops console looks.
        query = "SELECT open FROM bank_circuit WHERE worker_id = $1"
        deadline = time.monotonic() + 5
        while await pipe.pool.fetchval(query, pipe.worker.worker_id) is not True:
            assert time.monotonic() < deadline, "the open breaker was not reported in bank_circuit"
            await asyncio.sleep(0.1)
    finally:
        await pipe.bank.chaos(down=False)
    row = await pipe.wait_status(pid, "authorized", timeout=20)
    assert len(await pipe.bank_entries("authorizations", op["bank_key"])) == 1
    # The mock's "down" resets connections after the request is in: from the worker's side
    # an answer may have been lost, so the fresh approval that came afterwards could be a
    # second hold. It is recorded, and flagged with a finding for a human (here: one hold).
    assert row["attention_required"] and row["last_error"]["code"] == "possible_duplicate_hold"
    assert await pipe.events(pid) == ["payment.authorized", "payment.attention_required"]
    findings = await pipe.pool.fetch("SELECT kind FROM reconciliation_findings WHERE payment_id = $1", pid)
    assert [f["kind"] for f in findings] == ["possible_duplicate_hold"]
    # Half-open: that was its first trial call; two more successes close it.
    assert pipe.worker.breaker.state is State.HALF_OPEN
    for other in [await pipe.authorize(amount=460 + i) for i in range(2)]:
        await pipe.wait_status(other, "authorized", timeout=20)
    assert pipe.worker.breaker.state is State.CLOSED


async def test_already_done_then_a_real_answer_is_settled(pipe):
    """CONFIRM: the bank says authorization_already_used once; the same request again succeeds."""
    pid = await pipe.authorize(amount=600)
    await pipe.wait_status(pid, "authorized")
    await pipe.bank.arm_fault(
        action="error",
        path="/api/v1/captures",
        method="POST",
        status=400,
        times=1,
        body={"error": "authorization_already_used", "message": "injected"},
    )
    await pipe.request(pid, Action.CAPTURE)
    row = await pipe.wait_status(pid, "captured")
    assert not row["attention_required"]
    assert len((await pipe.bank.ledger())["captures"]) == 1
    assert (await pipe.operation(pid, "capture"))["attempts"] == 2


async def test_already_done_by_someone_else_is_parked_not_guessed(pipe):
    pid = await pipe.authorize(amount=650)
    row = await pipe.wait_status(pid, "authorized")
    status, _ = await pipe.bank_post("/api/v1/voids", "not-the-gateway", {"authorization_id": row["authorization_id"]})
    assert status == 200
    await pipe.request(pid, Action.CAPTURE)
    row = await pipe.wait(pid, lambda r: r["attention_required"])
    assert row["status"] == "capturing" and row["last_error"]["code"] == "bank_outcome_uncertain"
    op = await pipe.operation(pid, "capture")
    assert op["parked"] and op["attempts"] == 2
    assert len(await pipe.dead_letters(op["id"])) == 1
    assert (await pipe.bank.ledger())["captures"] == []


async def test_unknown_operation_is_dropped_and_an_unreadable_command_goes_to_the_dead_queue(pipe):
    await pipe.send_command(orjson.dumps({"operation_id": "op_does_not_exist"}), "authorize")
    tag = uuid.uuid4().hex
    await pipe.send_command(orjson.dumps({"not": tag}), "capture")
    (dead,) = await pipe.dead_letters(None, match=lambda m: tag.encode() in m.body)
    assert orjson.loads(dead.headers["last_error"])["code"] == "bad_message"
    assert await pipe.dead_letters("op_does_not_exist", wait=0.5) == []


# ---- leases, the 24 h rule, the sweeper, shutdown ---------------------------------------------


async def test_an_operation_leased_elsewhere_waits_for_the_lease(pipe):
    async with pipe.relay_paused():
        pid = await pipe.authorize()
        await pipe.pool.execute(
            "UPDATE operations SET lease_owner = 'another-worker', lease_until = now() + interval '2 seconds'"
            " WHERE payment_id = $1",
            pid,
        )
        started = time.monotonic()
    await pipe.wait_status(pid, "authorized")
    assert time.monotonic() - started >= 1.5
    op = await pipe.operation(pid, "authorize")
    assert op["attempts"] == 1  # the bounce did not count as an attempt
    assert len(await pipe.bank_entries("authorizations", op["bank_key"])) == 1


async def test_authorize_first_tried_over_23_hours_ago_is_parked_unless_forced(pipe):
    async with pipe.relay_paused():
        pid = await pipe.authorize()
        await pipe.pool.execute(
            "UPDATE operations SET first_attempt_at = now() - interval '25 hours', attempts = 1 WHERE payment_id = $1",
            pid,
        )
    row = await pipe.wait(pid, lambda r: r["attention_required"])
    assert row["status"] == "pending" and row["last_error"]["code"] == "bank_key_expired"
    op = await pipe.operation(pid, "authorize")
    assert op["parked"]
    assert (await pipe.bank.ledger())["authorizations"] == []  # the bank was never called
    (dead,) = await pipe.dead_letters(op["id"])
    assert orjson.loads(dead.headers["last_error"])["code"] == "bank_key_expired"

    await pipe.replay(op["id"], "authorize", force=True)  # ops checked the bank: no hold
    await pipe.wait_status(pid, "authorized")
    assert len(await pipe.bank_entries("authorizations", op["bank_key"])) == 1


async def forged_command(pipe, headers: dict, *, first_tried_hours_ago: float | None = None) -> str:
    """A new authorization whose one command is published by a stranger with `headers`
    (the relay's is deleted unsent); returns the payment id."""
    async with pipe.relay_paused():
        pid = await pipe.authorize()
        op = await pipe.operation(pid, "authorize")
        await pipe.pool.execute(
            "DELETE FROM outbox WHERE message_id LIKE 'cmd_%' AND body = $1", orjson.dumps({"operation_id": op["id"]})
        )
        if first_tried_hours_ago is not None:
            await pipe.pool.execute(
                "UPDATE operations SET first_attempt_at = now() - make_interval(hours => $2), attempts = 1"
                " WHERE id = $1",
                op["id"],
                first_tried_hours_ago,
            )
    await pipe.send_command(orjson.dumps({"operation_id": op["id"]}), "authorize", headers)
    return pid


async def test_a_forged_x_force_does_not_send_an_old_authorization(pipe):
    """Only ops force a replay, on the operation's row: the header decides nothing."""
    pid = await forged_command(pipe, {"x-force": True}, first_tried_hours_ago=25)
    row = await pipe.wait(pid, lambda r: r["attention_required"] or r["status"] != "pending")
    assert row["status"] == "pending" and row["last_error"]["code"] == "bank_key_expired"
    assert (await pipe.bank.ledger())["authorizations"] == []  # the bank was never called


async def test_forged_retry_and_delivery_counts_do_not_park_an_operation(pipe):
    """x-retries past the ladder and x-delivery-count past WORKER_MAX_DELIVERIES, on a first
    delivery: the rungs come from the operation's row, the delivery count from the broker."""
    await pipe.bank.arm_fault(action="error", path="/api/v1/authorizations", method="POST", status=500, times=3)
    past_the_ladder = await forged_command(pipe, {"x-retries": 99})
    row = await pipe.wait(past_the_ladder, lambda r: r["attention_required"] or r["status"] != "pending")
    assert (row["status"], row["attention_required"]) == ("authorized", False)
    op = await pipe.operation(past_the_ladder, "authorize")
    assert (op["rungs"], op["attempts"], op["parked"]) == (1, 4, False)  # one rung after the 3 failed tries

    tired = await forged_command(pipe, {"x-delivery-count": 999})
    row = await pipe.wait(tired, lambda r: r["attention_required"] or r["status"] != "pending")
    assert (row["status"], row["attention_required"]) == ("authorized", False)


async def test_sweeper_reenqueues_an_operation_whose_command_was_lost(pipe):
    async with pipe.relay_paused():
        pid = await pipe.authorize()
        op = await pipe.operation(pid, "authorize")
        deleted = await pipe.pool.execute(
            "DELETE FROM outbox WHERE exchange = 'payments.commands'"
            " AND convert_from(body, 'UTF8')::jsonb ->> 'operation_id' = $1",
            op["id"],
        )
        assert deleted == "DELETE 1"
        await pipe.pool.execute(
            "UPDATE operations SET updated_at = now() - interval '1 minute' WHERE id = $1", op["id"]
        )
    await pipe.wait_status(pid, "authorized", timeout=20)
    assert len(await pipe.bank_entries("authorizations", op["bank_key"])) == 1


async def test_sweeper_expires_a_lapsed_hold_and_voids_it(pipe):
    pid = await pipe.authorize(amount=800)
    row = await pipe.wait_status(pid, "authorized")
    await pipe.pool.execute(
        "UPDATE payments SET authorization_expires_at = now() - interval '1 second' WHERE id = $1", pid
    )
    await pipe.wait_status(pid, "expired", timeout=20)
    release = await pipe.operation(pid, "release")
    deadline = time.monotonic() + 20
    while (await pipe.operation(pid, "release"))["status"] != "succeeded":
        assert time.monotonic() < deadline, "the hold was never released"
        await asyncio.sleep(0.1)
    (void,) = await pipe.bank_entries("voids", release["bank_key"])
    assert void["authorization_id"] == row["authorization_id"]
    assert await pipe.events(pid) == ["payment.authorized", "payment.expired"]


async def test_stop_finishes_in_flight_work_before_closing(pipe):
    await pipe.bank.chaos(min_latency_ms=1500, max_latency_ms=1500)
    pid = await pipe.authorize()
    deadline = time.monotonic() + 10
    while (await pipe.operation(pid, "authorize"))["lease_owner"] is None:  # the bank call is running
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await pipe.worker.stop()
    try:
        row = await pipe.pool.fetchrow("SELECT status FROM payments WHERE id = $1", pid)
        assert row["status"] == "authorized"
    finally:
        await pipe.start_worker()


async def test_worker_survives_a_broker_connection_loss(pipe):
    """connect_robust reconnects and consuming resumes; nothing is lost meanwhile."""
    await pipe.worker.connection.transport.connection.close()  # type: ignore[union-attr]
    pid = await pipe.authorize()
    await pipe.wait_status(pid, "authorized", timeout=40)


async def test_many_authorizations_at_once(pipe):
    """One worker keeps many slow bank calls in flight: 100 x 300 ms takes far less than 30 s."""
    await pipe.bank.chaos(min_latency_ms=300, max_latency_ms=300)
    started = time.monotonic()
    pids = await asyncio.gather(*(pipe.authorize(amount=10) for _ in range(100)))
    for pid in pids:
        await pipe.wait_status(pid, "authorized", timeout=30)
    assert time.monotonic() - started < 10
    assert len((await pipe.bank.ledger())["authorizations"]) == 100


async def test_topology_is_quorum_work_dead_and_ttl_ladder(pipe):
    ctl = shutil.which("rabbitmqctl")
    if not ctl or not pipe.vhost:
        pytest.skip("needs rabbitmqctl and a private vhost")
    out = subprocess.run(
        [ctl, "list_queues", "-p", pipe.vhost, "name", "type", "durable", "arguments", "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    queues = {q["name"]: q for q in json.loads(out)}
    assert queues["payments.work"]["type"] == "quorum" and queues["payments.dead"]["type"] == "quorum"
    for delay in (1, 2, 3):
        q = queues[f"payments.retry.quorum.{delay}s"]
        assert q["type"] == "quorum" and q["durable"]
        args = {entry[0]: entry[-1] for entry in q["arguments"]}  # [name, type, value]
        assert args["x-message-ttl"] == delay * 1000
        assert args["x-dead-letter-exchange"] == COMMANDS_EXCHANGE
        assert args["x-dead-letter-strategy"] == "at-least-once" and args["x-overflow"] == "reject-publish"


async def test_console_scripts_run_the_pipeline_and_stop_gracefully_on_sigterm(pipe):
    """gateway-relay and gateway-worker as real processes; SIGTERM while a bank call is in flight."""
    await pipe.worker.stop()
    await pipe.pause_relay()
    system = pipe.system
    relay, worker = await system.start_process("relay"), await system.start_process("worker")
    try:
        pid = await pipe.authorize()
        await pipe.wait_status(pid, "authorized", timeout=30)

        await pipe.bank.chaos(min_latency_ms=1500, max_latency_ms=1500)
        before = await bank_requests(pipe)
        slow = await pipe.authorize()
        await in_bank_call(pipe, before, system.procs[worker].stdout_tail)
        assert await system.terminate(worker, timeout=15) == 0, system.procs[worker].stderr_tail()
        assert (await pipe.pool.fetchrow("SELECT status FROM payments WHERE id = $1", slow))["status"] == "authorized"
        output = system.procs[worker].stdout_tail(1_000_000) + system.procs[worker].stderr_tail(1_000_000)
        assert "4111111111111111" not in output
        assert await system.terminate(relay, timeout=15) == 0, system.procs[relay].stderr_tail()
    finally:
        await system.terminate(worker)
        await system.terminate(relay)
        pipe.resume_relay()
        await pipe.start_worker()


async def test_gauges_come_from_the_database_and_the_broker_and_readiness_checks_all_three(pipe):
    worker = pipe.worker
    registry = worker.metrics.registry

    def gauges() -> tuple[float | None, ...]:
        names = ("gateway_operations_parked", "gateway_payments_flagged", "gateway_dead_letters")
        return tuple(registry.get_sample_value(name) for name in names)

    async def gauges_reach(expected: tuple[float | None, ...]) -> tuple[float | None, ...]:
        # A quorum queue's count in declare-ok may trail a confirm, or a requeue, a little.
        deadline = time.monotonic() + 10
        await worker.refresh_gauges()
        while gauges() != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await worker.refresh_gauges()
        return gauges()

    assert await worker.readiness() == {"database": True, "broker": True, "consuming": True}
    await worker.refresh_gauges()
    parked, flagged, dead = gauges()
    pid = await pipe.authorize(amount=3400)
    await pipe.wait_status(pid, "authorized")
    # As a park leaves it (the phases themselves are tested above): the operation parked, the
    # payment flagged, the command in payments.dead.
    op_id = (await pipe.operation(pid, "authorize"))["id"]
    await pipe.pool.execute("UPDATE operations SET status = 'pending', parked = true WHERE id = $1", op_id)
    await pipe.pool.execute("UPDATE payments SET attention_required = true WHERE id = $1", pid)
    channel = await pipe.broker.channel(publisher_confirms=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", headers={"operation_id": op_id}), routing_key=topology.DEAD_QUEUE
    )
    await channel.close()
    try:
        assert await gauges_reach((parked + 1, flagged + 1, dead + 1)) == (parked + 1, flagged + 1, dead + 1)
    finally:
        await pipe.pool.execute("UPDATE operations SET status = 'succeeded', parked = false WHERE id = $1", op_id)
        await pipe.pool.execute("UPDATE payments SET attention_required = false WHERE id = $1", pid)
        assert len(await pipe.dead_letters(op_id)) == 1
    # The other letters dead_letters took and put back count again.
    assert await gauges_reach((parked, flagged, dead)) == (parked, flagged, dead)
    stopped = Worker(pipe.settings, WORKER_CFG)
    assert await stopped.readiness() == {"database": False, "broker": False, "consuming": False}


@contextlib.asynccontextmanager
async def console_worker(pipe, **env: str):
    """gateway-worker as a real process (the in-process worker stopped meanwhile)."""
    await pipe.worker.stop()
    name = await pipe.system.start_process("worker", env={"WORKER_RETRY_LADDER": "1,2,3", **env})
    try:
        yield pipe.system.procs[name]
    finally:
        await pipe.system.terminate(name)
        await pipe.start_worker()


async def bank_requests(pipe) -> int:
    return (await pipe.bank.ledger())["stats"]["api_requests"]


async def in_bank_call(pipe, requests_before: int, output: Callable[[], str]) -> None:
    """Until the bank has received a request beyond `requests_before`. A claimed operation is not
    yet a call: a SIGTERM between the claim and the request rightly starts no call at all."""
    deadline = time.monotonic() + 10
    while await bank_requests(pipe) <= requests_before:
        assert time.monotonic() < deadline, output()
        await asyncio.sleep(0.02)


async def test_sigterm_finishes_the_call_under_way_records_it_and_leaves_waiting_commands(pipe):
    """One bank call at a time (WORKER_CONCURRENCY=1): SIGTERM during a 3 s call. The call is not
    abandoned: its outcome is recorded before the process exits, and the receipt names the
    hold the bank's ledger has. The command waiting behind it is not started; it goes back
    to the queue and the next worker settles it."""
    await pipe.bank.chaos(min_latency_ms=3000, max_latency_ms=3000)
    async with console_worker(pipe, WORKER_CONCURRENCY="1", BANK_TIMEOUT_SECONDS="10") as worker:
        before = await bank_requests(pipe)
        slow = await pipe.authorize(amount=3100)
        await in_bank_call(pipe, before, worker.stdout_tail)
        waiting = await pipe.authorize(amount=3200)
        await asyncio.sleep(0.5)  # delivered to the worker, waiting for the one slot
        signalled = time.monotonic()
        worker.popen.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(timeout=20) == 0, worker.stderr_tail()
        assert time.monotonic() - signalled > 1.5  # it waited for the bank's answer
        row = dict(await pipe.pool.fetchrow("SELECT * FROM payments WHERE id = $1", slow))
        assert row["status"] == "authorized"
        op = await pipe.operation(slow, "authorize")
        (hold,) = await pipe.bank_entries("authorizations", op["bank_key"])
        assert hold["authorization_id"] == row["authorization_id"] and hold["amount"] == 3100
        left = await pipe.operation(waiting, "authorize")
        assert (left["status"], left["attempts"], left["lease_owner"]) == ("pending", 0, None)
        assert "4111111111111111" not in worker.stdout_tail(1_000_000) + worker.stderr_tail(1_000_000)
    await pipe.bank.chaos(min_latency_ms=5, max_latency_ms=30)
    await pipe.wait_status(waiting, "authorized")
    assert len(await pipe.bank_entries("authorizations", left["bank_key"])) == 1


async def test_sigterm_after_a_failed_try_starts_no_other_call(pipe):
    """The call under way when SIGTERM arrives fails (a 2 s 500): no quick retry follows, the
    lease is given back and the command returns to the queue for the next worker."""
    await pipe.bank.arm_fault(
        action="error", path="/api/v1/authorizations", method="POST", status=500, delay_ms=2000, times=1
    )
    async with console_worker(pipe) as worker:
        before = await bank_requests(pipe)
        pid = await pipe.authorize(amount=3300)
        await in_bank_call(pipe, before, worker.stdout_tail)
        worker.popen.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(timeout=20) == 0, worker.stderr_tail()
        op = await pipe.operation(pid, "authorize")
        assert (op["status"], op["attempts"], op["lease_owner"]) == ("pending", 1, None)
        assert op["last_error"]["code"] == "internal_error"
        ledger = await pipe.bank.ledger()
        assert ledger["stats"]["api_requests"] == 1 and ledger["authorizations"] == []
    await pipe.wait_status(pid, "authorized")
    assert len(await pipe.bank_entries("authorizations", op["bank_key"])) == 1


def test_bad_worker_setting_exits_2():
    from harness.procs import run_script

    result = run_script(
        "gateway-worker",
        env={"CARD_ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode(), "WORKER_RETRY_LADDER": "5,1"},
    )
    assert result.returncode == 2 and "WORKER_RETRY_LADDER" in result.stderr
    assert run_script("gateway-relay", "--help").returncode == 0


@pytest.mark.parametrize(
    ("script", "variable"), [("gateway-worker", "WORKER_METRICS_PORT"), ("gateway-relay", "RELAY_METRICS_PORT")]
)
def test_a_taken_metrics_port_stops_the_process_with_a_message(script, variable):
    import socket

    from harness.procs import run_script

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        key = base64.b64encode(b"k" * 32).decode()
        result = run_script(script, env={"CARD_ENCRYPTION_KEY": key, variable: str(port)})
    assert result.returncode == 1, result.stderr
    assert f"{script}: cannot serve metrics on 127.0.0.1:{port}" in result.stderr
