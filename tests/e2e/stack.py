"""The running system (harness/system.py) as FicMart sees it: tests/e2e and tests/crash.

    stack = Stack(server_urls, card_key, bank_env={...}, gateway_env={...})   # over BANK_ENV, GATEWAY_ENV
    await stack.start()          # System.start(): private database + vhost, mockbank, gateway-api,
                                 # gateway-relay, gateway-worker; then the test's event consumer
    client = stack.client()      # FicMart: Bearer key, Idempotency-Key, retries
    stack.bank                   # MockBankClient: the mock's /_mock endpoints (ledger, chaos, faults...)
    stack.events                 # test consumer of payments.events.ficmart ('#'), deduped by event_id
    await stack.kill("worker"); await stack.restart("worker")   # and all else System offers
    await stack.restart_bank(AUTH_EXPIRY_HOURS="0.001")         # same port, env over BANK_ENV
    await stack.quiescent()      # nothing in flight, nothing unsent
    await stack.close()

    async with running_stack(server_urls, card_key) as stack: ...

The test process itself only talks HTTP to the API and the mock, AMQP to its own
event queue, and reads the database for the quiescence check (outbox rows unsent,
operations pending) through the harness's pool, which a test that terminates "the
gateway's connections" spares.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import aio_pika
import aiohttp
import asyncpg
import orjson

from gateway import broker
from gateway.messages import events_exchange
from harness.mockbank_client import api_card
from harness.procs import run_script
from harness.system import System

API_KEY = "sk_test_ficmart_dev"
MERCHANT = "ficmart"
OTHER_API_KEY = "sk_test_other_e2e"  # a second caller, to tell two merchants' events apart
OTHER_MERCHANT = "other"
IN_PROGRESS = frozenset({"pending", "capturing", "voiding", "refunding"})
EVENT_STATUSES = frozenset({"authorized", "declined", "captured", "voided", "refunded", "expired"})

HAPPY = {"number": "4111111111111111", "cvv": "123", "expiry_month": 12, "expiry_year": 2030}
NO_FUNDS = {"number": "5555555555554444", "cvv": "789", "expiry_month": 9, "expiry_year": 2030}
# The bank's stored expiry of this card is 03/2020; the request's own expiry must be valid
# for the gateway to accept it (the bank does not compare the two).
EXPIRED_CARD = {"number": "5105105105105100", "cvv": "321", "expiry_month": 3, "expiry_year": 2030}

# Chaos off, fast: the tests turn it on where they need it.
BANK_ENV = {
    "MIN_LATENCY_MS": "0",
    "MAX_LATENCY_MS": "20",
    "FAILURE_RATE": "0",
    "RESPONSE_LOSS_RATE": "0",
    "MOCKBANK_EXTRA_ACCOUNTS": "50",
    "LOG_LEVEL": "warning",
}
# A short ladder and short leases so that retries, parking and crash recovery take seconds.
GATEWAY_ENV = {
    "WORKER_RETRY_LADDER": "1,2,4",
    "WORKER_QUICK_RETRIES": "3",
    "WORKER_QUICK_RETRY_BASE_SECONDS": "0.05",
    "BANK_TIMEOUT_SECONDS": "3",
    "WORKER_LEASE_MARGIN_SECONDS": "1",
    "WORKER_CONFIRM_DELAY_SECONDS": "0.2",
    "WORKER_CONCURRENCY": "64",
    "WORKER_PREFETCH": "128",
    "WORKER_DB_POOL_SIZE": "8",
    "SWEEPER_INTERVAL_SECONDS": "0.5",
    "SWEEPER_STUCK_AFTER_SECONDS": "2",
    "RELAY_POLL_SECONDS": "0.2",
    "LOG_LEVEL": "warning",
}


class StackError(AssertionError):
    pass


# ---- FicMart's HTTP client --------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: dict | None
    headers: dict


@dataclass
class ClientStats:
    connection_errors: int = 0
    server_errors: int = 0
    in_progress: int = 0
    replayed: int = 0


class Client:
    """What FicMart's order service does: every POST has an Idempotency-Key, and a request whose
    answer did not arrive (connection error, timeout, 5xx, 429, 409 request_in_progress) is sent again
    with the SAME key until it gets an answer or `patience` seconds pass."""

    def __init__(self, api_url: str, http: aiohttp.ClientSession, *, patience: float = 120.0, api_key: str = API_KEY):
        self.api_url = api_url
        self.http = http
        self.patience = patience
        self.stats = ClientStats()
        self.auth = {"Authorization": f"Bearer {api_key}"}

    async def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        key: str | None = None,
        params: dict | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        headers = dict(self.auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        data = orjson.dumps(body) if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        deadline = time.monotonic() + self.patience
        delay = 0.1
        while True:
            try:
                async with self.http.request(
                    method,
                    f"{self.api_url}{path}",
                    data=data,
                    headers=headers,
                    params=params,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    raw = await resp.read()
                    reply = Reply(resp.status, orjson.loads(raw) if raw else None, dict(resp.headers))
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
                self.stats.connection_errors += 1
            else:
                code = (reply.body or {}).get("error", {}).get("code") if isinstance(reply.body, dict) else None
                if reply.status >= 500:
                    self.stats.server_errors += 1
                elif reply.status == 409 and code == "request_in_progress":
                    self.stats.in_progress += 1
                elif reply.status == 429:
                    self.stats.server_errors += 1  # shed for load, like a 503: the same request again
                else:
                    if reply.headers.get("Idempotent-Replayed") == "true":
                        self.stats.replayed += 1
                    return reply
            if time.monotonic() > deadline:
                raise StackError(f"{method} {path} got no answer within {self.patience:g}s")
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 1.0)

    async def authorize(
        self, *, order_id: str, amount: int, card: dict, customer_id: str = "cus_e2e", key: str | None = None
    ) -> Reply:
        body = {"order_id": order_id, "customer_id": customer_id, "amount": amount, "currency": "USD", "card": card}
        return await self.request("POST", "/v1/payments", body, key=key or uuid.uuid4().hex)

    async def act(self, payment_id: str, action: str, key: str | None = None) -> Reply:
        return await self.request("POST", f"/v1/payments/{payment_id}/{action}", key=key or uuid.uuid4().hex)

    async def payment(self, payment_id: str, wait: float | None = None) -> dict:
        params = {"wait": str(wait)} if wait else None
        reply = await self.request("GET", f"/v1/payments/{payment_id}", params=params, timeout=(wait or 0) + 10.0)
        if reply.status != 200:
            raise StackError(f"GET {payment_id}: HTTP {reply.status} {reply.body}")
        return reply.body

    async def by_order(self, order_id: str) -> list[dict]:
        reply = await self.request("GET", "/v1/payments", params={"order_id": order_id})
        assert reply.status == 200, reply
        return reply.body["data"]

    async def settled(
        self, payment_id: str, timeout: float = 60.0, poll: float = 10.0, *, flagged_before: bool = False
    ) -> dict:
        """Long-poll until the payment leaves its in-progress status (or is parked for ops).
        `flagged_before`: the payment already carried attention_required (a doubt about an earlier
        step), so the flag says nothing about this step: wait for the status alone."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            payment = await self.payment(payment_id, wait=max(1, min(poll, int(left))))
            if payment["status"] not in IN_PROGRESS or (payment["attention_required"] and not flagged_before):
                return payment
            if time.monotonic() > deadline:
                return payment


# ---- the test's own event consumer -------------------------------------------------------------


class EventLog:
    """Every message on the merchant's payments.events.<merchant> ('#'), deduplicated by event_id.

    exclusive=True: an exclusive queue, gone with the connection (enough when the broker is
    left alone). The crash tests pass a queue name instead: a durable queue in the private
    vhost survives the connection drops they cause, so no event is missed for that reason.
    """

    def __init__(self, amqp_url: str, queue_name: str | None = None, merchant: str = MERCHANT):
        self.amqp_url = amqp_url
        self.merchant = merchant
        self.queue_name = queue_name
        self.events: dict[str, dict] = {}
        self._by_payment: dict[str, list[dict]] = {}
        self.meta: dict[str, tuple[str, str | None]] = {}  # event_id -> (routing key, message_id)
        self.headers: dict[str, dict] = {}  # event_id -> AMQP headers
        self.deliveries = 0
        self.bad: list[str] = []
        self._changed = asyncio.Event()
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self.connection = await broker.connect_robust(
            self.amqp_url, client_properties={"connection_name": "e2e-events"}
        )
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(
            events_exchange(self.merchant), aio_pika.ExchangeType.TOPIC, durable=True
        )
        if self.queue_name:
            # quorum: FicMart's queue outlives a broker node's death, as the gateway's do
            queue = await channel.declare_queue(self.queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        else:
            queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key="#")
        await queue.consume(self._on_message)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.deliveries += 1
        try:
            self.record(orjson.loads(message.body), message.routing_key, message.message_id, message.headers)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.bad.append(f"unreadable event {message.body[:200]!r}")
        await message.ack()

    def record(self, body: dict, routing_key: str, message_id: str | None, headers: dict | None = None) -> bool:
        """Keep an event unless its event_id was seen before; True when it is new."""
        event_id = body["event_id"]
        if event_id in self.events:
            return False
        self.events[event_id] = body
        self.meta[event_id] = (routing_key, message_id)
        self.headers[event_id] = dict(headers or {})
        self._by_payment.setdefault(body["payment"]["id"], []).append(body)
        self._changed.set()
        return True

    def of(self, payment_id: str) -> list[dict]:
        return list(self._by_payment.get(payment_id, ()))

    def types(self, payment_id: str) -> Counter:
        return Counter(e["type"] for e in self.of(payment_id))

    async def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return True


# ---- the stack ---------------------------------------------------------------------------------


class Stack(System):
    """The system with chaos off and short timings (BANK_ENV, GATEWAY_ENV, overridable), one
    process of each kind unless `scale` says otherwise, plus FicMart's client and event log."""

    def __init__(
        self,
        server_urls: tuple[str, str],
        card_key: str,
        *,
        bank_env: Mapping[str, str | None] | None = None,
        gateway_env: Mapping[str, str | None] | None = None,
        event_queue: str | None = None,
        **options,
    ):
        super().__init__(
            server_urls,
            card_key,
            bank_env={**BANK_ENV, **(bank_env or {})},
            gateway_env={**GATEWAY_ENV, **(gateway_env or {})},
            api_keys=f"{MERCHANT}:{API_KEY},{OTHER_MERCHANT}:{OTHER_API_KEY}",
            api_args=("--db-pool-size", "10"),
            **options,
        )
        self.event_queue = event_queue
        self.events: EventLog | None = None
        self.http: aiohttp.ClientSession | None = None

    async def start(self, *kinds: str) -> Stack:
        await super().start(*kinds)
        if self.events is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
            self.events = EventLog(self.amqp_url, self.event_queue)
            await self.events.start()
        return self

    async def close(self) -> None:
        if self.events is not None:
            await self.events.close()
        if self.http is not None:
            await self.http.close()
        await super().close()

    async def restart_bank(self, **env: str) -> None:
        """The mock bank again on its port, with `env` over the stack's settings. Its books
        start empty (the mock keeps them in memory)."""
        await self.restart("mockbank", env=env)

    def client(self, patience: float = 120.0, api_key: str = API_KEY) -> Client:
        assert self.http is not None, "not started"
        return Client(self.api_url, self.http, patience=patience, api_key=api_key)

    def gatewayctl(self, *args: str) -> str:
        """Run gatewayctl against the stack's database and broker; its output (it must succeed)."""
        env = {"DATABASE_URL": self.database_url, "AMQP_URL": self.amqp_url, "GATEWAY_API_KEYS": self.api_keys}
        result = run_script("gatewayctl", *args, timeout=60, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    async def extra_cards(self, count: int) -> list[dict]:
        """Generated bank accounts ($100M each), as the gateway's API takes a card."""
        return [api_card(a) for a in await self.bank.extra_accounts(count)]

    async def backlog(self) -> dict:
        """What is still in flight: unsent outbox rows, pending operations not parked,
        payments in progress not flagged for ops."""
        assert self.pool is not None, "not started"
        row = await self.pool.fetchrow(
            """SELECT (SELECT count(*) FROM outbox) AS unsent,
                      (SELECT count(*) FROM operations WHERE status = 'pending' AND NOT parked) AS running,
                      (SELECT count(*) FROM payments
                        WHERE status IN ('pending', 'capturing', 'voiding', 'refunding')
                          AND NOT attention_required) AS in_progress"""
        )
        return dict(row)

    async def quiescent(self, timeout: float = 60.0) -> dict:
        """Wait until nothing is in flight (twice in a row, 0.5 s apart); returns the last backlog."""
        deadline = time.monotonic() + timeout
        calm = 0
        while True:
            try:
                backlog = await self.backlog()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                backlog = {"unreachable": 1}
            calm = calm + 1 if not any(backlog.values()) else 0
            if calm >= 2:
                return backlog
            if time.monotonic() > deadline:
                return backlog
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def running_stack(server_urls, card_key, **options):
    """A started Stack, closed on the way out whatever happened."""
    async with Stack(server_urls, card_key, **options) as stack:
        yield stack
