"""FicMart's checkouts against the gateway's admission as shipped (issue 20).

A FicMart-like client (aiohttp) submits POST /v1/payments and then long-polls
GET /v1/payments/{id}?wait=30 until the payment is final. A refusal (429/503)
is counted, and the same request is sent again after Retry-After, as FicMart
would: the figure that matters is how many there were (none is the target).

closed(n): n such clients, over and over, for a number of payments (cost.census:
completed/s, CPU per completed authorization per part and summed). A closed population cannot
overload a durable queue, each client having one checkout outstanding: the
gateway must take all of it.

flash_sale: `clients` clients each submit `per_client` payments as fast as they
are answered (5000 from 1000 clients in a couple of seconds), then long-poll
each to final: refusals, how long the submits took, and the time until the last
one was final.

refusal_cost: the API's CPU per refused POST, from /proc, with every POST refused
(a rate of new requests so low that the caller's bucket never holds a token),
sent by the lean client over 64 connections: HTTP parsing, the middleware, the
decision and the 429 answer, all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from bench import cost, load, rawhttp
from bench.system import BenchSystem
from bench.util import cpu_seconds


@dataclass
class Closed:
    clients: int
    census: cost.Census

    def table(self) -> str:
        return f"{self.clients} clients; " + self.census.table()


async def closed(
    system: BenchSystem, http: aiohttp.ClientSession, cards: list[dict], *, clients: int, count: int, scale: int
) -> Closed:
    result = await cost.census(
        system,
        http,
        cards,
        clients=clients,
        count=count,
        warmup=max(300, clients),
        scale={"api": scale, "relay": scale, "worker": scale},
    )
    return Closed(clients, result)


@dataclass
class FlashSale:
    clients: int
    submits: int
    submit_seconds: float  # from the first submit until the last was accepted
    last_final_seconds: float  # from the first submit until the last payment was final
    refused: Counter
    other: Counter  # answers that were neither 202 nor a refusal
    final: int

    def table(self) -> str:
        refused = sum(self.refused.values())
        return (
            f"{self.submits} submits from {self.clients} clients in {self.submit_seconds:.1f} s; refused {refused} "
            f"{dict(self.refused) if refused else ''}; other answers {dict(self.other) or 0}; "
            f"final {self.final}/{self.submits}, the last {self.last_final_seconds:.1f} s after the first submit"
        )


async def flash_sale(
    system: BenchSystem, http: aiohttp.ClientSession, cards: list[dict], *, clients: int, per_client: int
) -> FlashSale:
    source = load.authorize_source("flash", cards)
    urls = system.api_urls
    refused: Counter[int] = Counter()
    other: Counter[str] = Counter()
    accepted_at: list[float] = []
    final_at: list[float] = []

    async def client(n: int) -> None:
        base = urls[n % len(urls)]
        ids = []
        for j in range(per_client):
            payment_id = await cost.submit(http, base, source(n * per_client + j), refused)
            if payment_id is None:
                other["not accepted"] += 1
                continue
            accepted_at.append(time.perf_counter())
            ids.append(payment_id)
        for payment_id in ids:
            while (await cost.poll(http, base, payment_id, cost.WAIT)) in cost.IN_PROGRESS:
                pass
            final_at.append(time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return FlashSale(
        clients=clients,
        submits=clients * per_client,
        submit_seconds=max(accepted_at, default=started) - started,
        last_final_seconds=max(final_at, default=started) - started,
        refused=refused,
        other=other,
        final=len(final_at),
    )


@dataclass
class RefusalCost:
    refused: int
    statuses: Counter
    api_cpu_ms: float  # per refused POST
    per_second: float

    def table(self) -> str:
        return (
            f"{self.refused} POSTs refused at {self.per_second:,.0f}/s ({dict(self.statuses)}); "
            f"API CPU per refusal {self.api_cpu_ms:.3f} ms"
        )


async def refusal_cost(
    system: BenchSystem, cards: list[dict], *, count: int, measuring: Callable[[], AsyncContextManager] | None = None
) -> RefusalCost:
    """`measuring`: entered around the measured refusals, the API restarted starved (a profiler)."""
    starving = ["--post-rate", "0.01"]  # a bucket of 0.05 tokens: every POST is refused
    system.api_args += starving
    for name in system.names("api"):
        await system.restart(name)
    try:
        api = urlsplit(system.api_url)
        pool = rawhttp.Pool(api.hostname or "127.0.0.1", api.port or 80, 64)
        await pool.connect()
        source = load.authorize_source("refused", cards)
        statuses: Counter[int] = Counter()
        connections = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            req = source(i)
            async with connections:
                answer = await pool.post(req.path, req.body, {**load.HEADERS, "Idempotency-Key": req.key})
            statuses[answer.status] += 1

        await asyncio.gather(*(one(i) for i in range(count // 10)))  # warm
        pid = system.pid(system.names("api")[0])
        async with measuring() if measuring else contextlib.nullcontext():
            cpu0, started = cpu_seconds(pid) or 0.0, time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(count // 10, count // 10 + count)))
            cpu1, seconds = cpu_seconds(pid) or 0.0, time.perf_counter() - started
        await pool.close()
    finally:
        system.api_args = system.api_args[: -len(starving)]
        for name in system.names("api"):
            await system.restart(name)
    return RefusalCost(count, statuses, (cpu1 - cpu0) * 1000 / count, count / seconds)
