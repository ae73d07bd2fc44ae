"""What webhook delivery costs: CPU per event delivered, across the gateway's processes.

    .venv/bin/python -m bench.webhooks                  # 500 events/s for 20 s, twice
    .venv/bin/python -m bench.webhooks --rate 500 --seconds 20

A private database and vhost (the system harness), gateway-webhooks, and a fast receiver
in this process (its CPU is the load generator's, not counted). Events are written to the
outbox at --rate per second, each in a transaction of its own, as the payment phases write
them. The same load runs twice: with no endpoint registered (the events are recorded for
the feed, nothing is delivered), then with one (every event is delivered, signed). What
delivery adds is the difference, per event, in CPU of gateway-webhooks and of the
database's backends (the writers' own, which now also queue the delivery, and the
deliverer's claims and outcomes). Target: at most 0.3 ms per event.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import time
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from bench.util import cpu_seconds, sleep_until
from gateway import db, messages, webhooks
from gateway.cards import SINGLE_KEY_ID, CardKey
from gateway.timefmt import now
from gateway.webhook_rules import SecretBox
from harness import services
from harness.procs import free_port
from harness.system import System

MERCHANT = "bench"
TARGET_MS = 0.3
INSERT = "INSERT INTO outbox (exchange, routing_key, message_id, body, headers) VALUES ($1, $2, $3, $4, $5)"
PAYMENT = {"id": "pay_" + "0" * 32, "status": "captured", "amount": 5000, "history": [{"status": "captured"}] * 3}


@dataclass
class Phase:
    name: str
    events: int
    seconds: float
    webhooks_ms: float  # CPU ms per event
    postgres_ms: float

    def row(self) -> str:
        total = self.webhooks_ms + self.postgres_ms
        return (
            f"{self.name:<22} {self.events:>6} {self.seconds:6.1f} s   gateway-webhooks {self.webhooks_ms:5.3f}   "
            f"postgres {self.postgres_ms:5.3f}   = {total:5.3f} ms/event"
        )


class Bench:
    def __init__(self, system: System, rate: int, seconds: float):
        self.system, self.rate, self.seconds = system, rate, seconds
        self.received = 0

    async def receive(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        return web.Response(status=204)

    async def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of gateway-webhooks and of the private database's backends."""
        assert self.system.pool is not None
        pids = await self.system.pool.fetchval(
            "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        postgres = sum(filter(None, (cpu_seconds(pid) for pid in pids or ())))
        return cpu_seconds(self.system.procs["webhooks"].pid) or 0.0, postgres

    async def load(self, writers: asyncpg.Pool) -> int:
        """--rate events/s for --seconds, each its own transaction; returns how many."""
        count = int(self.rate * self.seconds)
        started = time.perf_counter()
        pending: set[asyncio.Task] = set()
        for n in range(count):
            await sleep_until(started + n / self.rate)
            event = messages.event("payment.captured", PAYMENT, now(), merchant=MERCHANT)
            task = asyncio.create_task(
                writers.execute(INSERT, event.exchange, event.routing_key, event.message_id, event.body, event.headers)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        return count

    async def phase(self, name: str, writers: asyncpg.Pool, delivered: bool) -> Phase:
        before_wh, before_pg = await self.cpu()
        started = time.monotonic()
        first = self.received
        events = await self.load(writers)
        if delivered:
            while self.received - first < events:
                await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(1.0)  # as long as the deliverer's polls would take to notice
        seconds = time.monotonic() - started
        after_wh, after_pg = await self.cpu()
        return Phase(
            name, events, seconds, (after_wh - before_wh) * 1000 / events, (after_pg - before_pg) * 1000 / events
        )


async def main(rate: int, seconds: float) -> None:
    admin = os.environ.get("DATABASE_URL", services.LOCAL_DATABASE_URL)
    amqp = os.environ.get("AMQP_URL", services.LOCAL_AMQP_URL)
    card_key = base64.b64encode(os.urandom(32)).decode()
    system = System((admin, amqp), card_key, gateway_env={"LOG_LEVEL": "warning", "WEBHOOK_POLL_SECONDS": "0.1"})
    receiver_port = free_port()
    runner = web.AppRunner(web.Application(), access_log=None)
    try:
        await system.start("webhooks")
        assert system.database_url is not None
        bench = Bench(system, rate, seconds)
        runner.app.router.add_post("/hooks", bench.receive)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
        writers = await db.create_pool(system.database_url, min_size=8, max_size=8)
        try:
            without = await bench.phase("no endpoint", writers, delivered=False)
            await webhooks.register(
                writers,
                SecretBox([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))]),
                MERCHANT,
                f"http://127.0.0.1:{receiver_port}/hooks",
                development=True,
            )
            with_endpoint = await bench.phase("every event delivered", writers, delivered=True)
        finally:
            await writers.close()
        added = (with_endpoint.webhooks_ms + with_endpoint.postgres_ms) - (without.webhooks_ms + without.postgres_ms)
        print(f"webhook delivery at {rate} events/s ({os.cpu_count()} CPUs shared with everything else)")
        print(without.row())
        print(with_endpoint.row())
        verdict = "met" if added <= TARGET_MS else "NOT MET"
        print(f"delivery adds {added:.3f} ms of CPU per event (target {TARGET_MS}: {verdict})")
    finally:
        await runner.cleanup()
        await system.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=500, help="events per second (500)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per phase (20)")
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds))
