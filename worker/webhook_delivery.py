"""gateway-webhooks: POST every event to its merchant's webhook endpoint, at least once.

    claim due deliveries    one statement, FOR UPDATE SKIP LOCKED, leased: their next_attempt_at
                            moves past the attempt, so a deliverer that dies leaves them due again
    POST each               signed (webhook_rules.signature), at most WEBHOOK_ENDPOINT_CONCURRENCY
                            at once per endpoint, 10 s, no redirects, the answer's body read only
                            up to a small bound, every resolved address checked (outside development
                            mode only public ones are connected to)
    record the outcomes     one statement per batch: delivered (a 2xx), or tried again after a
                            doubling, jittered delay, or failed once the next try would fall past
                            the retry window (3 days) from the first

A process of its own rather than a task of the relay: a merchant's endpoint is slow or down
on its own schedule, and its retries, TLS handshakes and timeouts must neither take the
relay's CPU nor hold up the publishing of payments' commands. The payment transactions only
write the delivery row (schema.sql: record_events); nothing waits for a delivery. A dead
endpoint costs one connection attempt per delivery per retry, spread by the backoff; nothing
is claimed for it between tries. Several deliverers may run: SKIP LOCKED shares the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway import config, db, logs, monitoring, process, store
from gateway.webhook_rules import (
    DELIVERY_TIMEOUT_SECONDS,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    SecretBox,
    SecretUnreadable,
    UrlRefused,
    address_allowed,
    check_url,
    gives_up,
    signature,
    signing_secrets,
)
from worker.settings import WebhookSettings

log = logs.get("webhooks")

RESPONSE_BODY_LIMIT = 4096  # what is read of an answer (its body is not used): no more
# One claim takes at most this many rounds of an endpoint's concurrency, and an endpoint with
# that many in flight here is not claimed for: a claimed delivery waits at most twice that many
# timeouts for its turn, and the lease outlasts them all.
CLAIM_ROUNDS = 4
LEASE_SECONDS = DELIVERY_TIMEOUT_SECONDS * (2 * CLAIM_ROUNDS + 1) + 30
# After a delivery ends, outcomes are gathered this long before they are recorded together.
GATHER_SECONDS = 0.05
USER_AGENT = "FicMart-Gateway-Webhooks/1"


class AddressRefused(OSError):
    """The endpoint's host resolves to an address the deliverer may not connect to."""


class GuardedResolver(AbstractResolver):
    """The system resolver, refusing a name any of whose addresses is not public (outside
    development mode). The connection then goes to exactly the addresses checked here, so a
    name that resolves elsewhere a moment later (DNS rebinding) gains nothing."""

    def __init__(self, *, development: bool):
        self._inner = DefaultResolver()
        self._development = development

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if not all(address_allowed(r["host"], development=self._development) for r in found):
            raise AddressRefused(f"{host} resolves to an address that is not public")
        return found

    async def close(self) -> None:
        await self._inner.close()


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.attempts = Counter(
            "gateway_webhook_attempts",
            "Webhook delivery attempts by outcome (delivered, retry, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.children = {o: self.attempts.labels(outcome=o) for o in ("delivered", "retry", "failed")}
        self.in_flight = Gauge("gateway_webhook_in_flight", "Webhook deliveries under way", registry=self.registry)


async def _read_bounded(response: aiohttp.ClientResponse) -> None:
    """Read at most RESPONSE_BODY_LIMIT bytes of the answer; a longer one closes the connection."""
    read = 0
    while read < RESPONSE_BODY_LIMIT:
        chunk = await response.content.read(RESPONSE_BODY_LIMIT - read)
        if not chunk:
            return
        read += len(chunk)
    if not response.content.at_eof():
        response.close()


class Deliverer:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox, cfg: WebhookSettings, *, development: bool):
        self.pool = pool
        self.box = box
        self.cfg = cfg
        self.development = development
        self.metrics = WebhookMetrics()
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, int] = {}  # merchant -> deliveries claimed and not recorded
        self._turns: dict[str, asyncio.Semaphore] = {}  # merchant -> its endpoint's concurrency
        self._outcomes: list[store.WebhookAttempt] = []
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._opened: dict[tuple[str, bytes], str] = {}  # (merchant, sealed) -> secret: opened once
        self.metrics.in_flight.set_function(lambda: sum(self._in_flight.values()))

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(development=self.development), limit=self.cfg.concurrency
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_SECONDS),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,  # no proxy from the environment: the deliverer calls what it checked
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- one delivery ---------------------------------------------------------------------

    async def post(self, delivery: Any) -> str | None:
        """POST one event; None when the endpoint answered 2xx, else what went wrong."""
        if self._session is None:
            raise RuntimeError("the deliverer has not started")
        url = delivery["url"]
        merchant = delivery["merchant"]
        try:
            check_url(url, development=self.development)  # the rules as they are now, address literals too
            old = delivery["old_secret"]
            secrets_ = signing_secrets(
                self._secret(merchant, delivery["secret"]),
                self._secret(merchant, old) if old is not None else None,
                delivery["old_secret_until"],
                delivery["now"],
            )
        except UrlRefused as exc:
            return f"url refused: {exc}"
        except SecretUnreadable:
            return "the signing secret does not open with this CARD_ENCRYPTION_KEY"
        body = bytes(delivery["body"])
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: delivery["event_id"],
            SIGNATURE_HEADER: signature(secrets_, int(time.time()), body),
        }
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                await _read_bounded(response)
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {DELIVERY_TIMEOUT_SECONDS:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {str(exc)[:200]}"

    def _secret(self, merchant: str, sealed: bytes) -> str:
        key = (merchant, bytes(sealed))
        secret = self._opened.get(key)
        if secret is None:
            if len(self._opened) > 10_000:  # rotations pile up sealed values: start over
                self._opened.clear()
            secret = self._opened[key] = self.box.open(merchant, key[1])
        return secret

    def _outcome(self, delivery: Any, error: str | None) -> store.WebhookAttempt:
        if error is None:
            self.metrics.children["delivered"].inc()
            return store.WebhookAttempt(delivery["id"], "delivered", None, None)
        delay = process.backoff_delay(delivery["attempts"], first=self.cfg.retry_base, cap=self.cfg.retry_max)
        next_at = datetime.now(UTC) + timedelta(seconds=delay)
        if gives_up(delivery["retry_since"], next_at, timedelta(hours=self.cfg.retry_window_hours)):
            self.metrics.children["failed"].inc()
            log.warning(
                "webhook delivery failed for good",
                event_id=delivery["event_id"],
                merchant=delivery["merchant"],
                attempts=delivery["attempts"],
                error=error,
            )
            return store.WebhookAttempt(delivery["id"], "failed", None, error)
        self.metrics.children["retry"].inc()
        return store.WebhookAttempt(delivery["id"], "pending", next_at, error)

    async def _deliver(self, delivery: Any) -> None:
        merchant = delivery["merchant"]
        turn = self._turns.setdefault(merchant, asyncio.Semaphore(self.cfg.endpoint_concurrency))
        try:
            async with turn:
                error = await self.post(delivery)
            self._outcomes.append(self._outcome(delivery, error))
        finally:
            self._in_flight[merchant] -= 1
            self._wake.set()

    # ---- the loop -------------------------------------------------------------------------

    async def record(self) -> int:
        """Record the outcomes gathered so far, in one statement."""
        outcomes, self._outcomes = self._outcomes, []
        if outcomes:
            try:
                await store.record_webhook_attempts(self.pool, attempts=outcomes)
            except Exception:
                self._outcomes = outcomes + self._outcomes  # kept for the next try (the lease holds them)
                raise
        return len(outcomes)

    async def claim(self) -> bool:
        """Claim what there is room for and start delivering it; True when the claim came back
        full (more may be due)."""
        room = self.cfg.concurrency - sum(self._in_flight.values())
        per_claim = self.cfg.endpoint_concurrency * CLAIM_ROUNDS
        busy = [m for m, n in self._in_flight.items() if n >= per_claim]
        if room <= 0:
            return False
        limit = room
        claimed = await store.claim_webhook_deliveries(
            self.pool, limit=limit, per_endpoint=per_claim, busy=busy, lease_seconds=LEASE_SECONDS
        )
        for delivery in claimed:
            self._in_flight[delivery["merchant"]] = self._in_flight.get(delivery["merchant"], 0) + 1
            task = asyncio.create_task(self._deliver(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed) == limit

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then let the deliveries under way end and record them."""
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        failures = 0
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.record()
                    more = await self.claim()
                    failures = 0
                except Exception as exc:  # the database is away: back off, try again
                    failures += 1
                    log.warning("webhook pass failed", error=type(exc).__name__, detail=str(exc)[:200])
                    await process.wait(stop, process.backoff_delay(failures, first=0.5, cap=30.0))
                    continue
                if more:
                    continue  # a full claim: there may be more due
                if await process.wait(self._wake, self.cfg.poll_seconds) and not stop.is_set():
                    await asyncio.sleep(GATHER_SECONDS)  # let a few more deliveries end first
        finally:
            stopping.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=DELIVERY_TIMEOUT_SECONDS + 1)
            with contextlib.suppress(Exception):
                await self.record()

    async def readiness(self) -> dict[str, bool]:
        return {"database": await monitoring.database_answers(self.pool)}


async def serve(settings: config.Settings, cfg: WebhookSettings, stop: asyncio.Event, metrics_host: str) -> None:
    box = SecretBox(settings.card_keyring)  # config.load(uses_card_key=True) made sure there is one
    pool = await process.start_with_retries(
        lambda: db.create_pool(settings.database_url, min_size=1, max_size=4), what="webhook deliverer", stop=stop
    )
    if pool is None:
        return
    deliverer = Deliverer(pool, box, cfg, development=settings.development)
    monitoring.pool_gauges(deliverer.metrics.registry, lambda: pool)
    endpoint = monitoring.Endpoint(deliverer.metrics.registry, deliverer.readiness)
    try:
        if cfg.metrics_port:
            await endpoint.start(metrics_host, cfg.metrics_port)
        await deliverer.start()
        log.info("webhook deliverer started", concurrency=cfg.concurrency, per_endpoint=cfg.endpoint_concurrency)
        await deliverer.run(stop)
    finally:
        await deliverer.close()
        await endpoint.close()
        await pool.close()
        log.info("webhook deliverer stopped")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway-webhooks",
        description="Deliver every payment event to its merchant's webhook endpoint, signed, at least once.",
        epilog=config.epilog(
            config.Settings, WebhookSettings, unused=("AMQP_URL", "BANK_URL", "GATEWAY_API_KEYS", "GATEWAY_OPS_KEYS")
        ),
    )
    monitoring.add_host_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = config.load(uses_card_key=True)
    cfg = WebhookSettings.load()
    process.give_way(cfg.nice)
    logs.setup(settings.log_level, "gateway-webhooks")
    try:
        process.run(lambda stop: serve(settings, cfg, stop, args.metrics_host))
    except monitoring.ListenError as exc:
        print(f"gateway-webhooks: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
