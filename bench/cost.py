"""The cost of a payment, and what the API does when offered more than it can take.

census: `clients` FicMart-like clients (aiohttp), each submitting an authorization
and then long-polling it (GET ?wait=) until it is final, over and over; the mock
bank at zero latency, no injected failures. CPU seconds of every part are read
from /proc before and after the measured part (bench/system.py, Snapshot) and
divided by the payments completed in it: each gateway process kind, PostgreSQL
(the private database's backends and the server's own processes), RabbitMQ (the
node serving the vhost), and apart from the gateway's total, the mock bank and
this load generator. The checkout scenarios (bench/checkouts.py) run it.

overload: submits only, offered open loop at `factor` times the rate the gateway
completed in a closed-loop measurement just before (the c=256 checkouts, or
capacity()), for `seconds`. Every answer must be a 202 or a quick 503/429 with
Retry-After; the accepted must all settle afterwards. Goodput: the accepted,
divided by the time from the window's start until the last of them was final.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench import load, rawhttp
from bench.system import BenchSystem, CostUnknown, Snapshot
from bench.util import pcts
from worker.relay import BUSY_SECONDS

GATEWAY_PARTS = ("api", "relay", "worker", "postgres", "rabbitmq")
OTHER_PARTS = ("mockbank", "loadgen")
# Shared with whatever else uses the server and the broker: their CPU while the gateway idles
# (other users' work, their own ticking) is measured before the load and shown beside them;
# the figure itself keeps it all.
SHARED_PARTS = ("postgres", "rabbitmq")
IDLE_SECONDS = 2.0
IN_PROGRESS = {"pending", "capturing", "voiding", "refunding"}
REFUSED = (429, 503)  # refused for load
WAIT = 30  # the long poll's ?wait=, seconds: FicMart's


@dataclass
class Census:
    completed: int
    seconds: float
    cpu_ms: dict[str, float]  # part -> CPU ms per completed payment
    submit_to_final_ms: dict[float, float]
    scale: dict[str, int]
    refused: int  # submits answered 429/503 (each sent again after Retry-After)
    # shared part -> its CPU ms per second with the gateway idle, just before: others' work
    idle_ms_per_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds

    @property
    def gateway_ms(self) -> float:
        return sum(self.cpu_ms.get(p, 0.0) for p in GATEWAY_PARTS)

    @property
    def idle_ms(self) -> dict[str, float]:
        """shared part -> what its idle rate makes per completed payment over the window."""
        return {p: rate * self.seconds / self.completed for p, rate in self.idle_ms_per_s.items()}

    def table(self) -> str:
        idle = self.idle_ms
        rows = [
            f"{p:<10} {self.cpu_ms.get(p, 0.0):7.2f}"
            + (f"   (of which {idle[p]:.2f} at its rate with the gateway idle)" if p in idle else "")
            for p in GATEWAY_PARTS
        ]
        rows.append(f"{'= gateway':<10} {self.gateway_ms:7.2f}")
        if idle:
            less = self.gateway_ms - sum(idle.values())
            rows.append(f"{'  less idle':<10} {less:7.2f}   (less the shared parts' idle rate)")
        rows += [f"{p:<10} {self.cpu_ms.get(p, 0.0):7.2f}   (not counted)" for p in OTHER_PARTS]
        scale = ", ".join(f"{k} x{v}" for k, v in self.scale.items())
        head = (
            f"completed authorizations: {self.completed} in {self.seconds:.1f} s = {self.rate:,.0f}/s "
            f"({scale}); submit to final p50 {self.submit_to_final_ms[50]:.1f} / "
            f"p99 {self.submit_to_final_ms[99]:.1f} ms; refused for load {self.refused}"
        )
        return "\n".join([head, "CPU ms per completed authorization:", *rows])


async def census(
    system: BenchSystem,
    http: aiohttp.ClientSession,
    cards: list[dict],
    *,
    clients: int,
    count: int,
    warmup: int,
    scale: dict[str, int],
    wait: int = WAIT,
) -> Census:
    """Closed loop of submit + long poll (?wait=`wait`) to final; the first `warmup` completions
    are not measured."""
    urls = system.api_urls
    source = load.authorize_source("census", cards)
    numbers = itertools.count()
    done = 0
    finals: list[float] = []
    marks: dict[str, object] = {}
    total = warmup + count
    refusals: Counter[int] = Counter()
    idle_ms_per_s = await _idle_rates(system)

    async def client(n: int) -> None:
        nonlocal done
        base = urls[n % len(urls)]
        while done < total:
            req = source(next(numbers))
            started = time.perf_counter()
            pid = await submit(http, base, req, refusals)
            if pid is None:
                continue
            while (await poll(http, base, pid, wait)) in IN_PROGRESS:
                pass
            done += 1
            if done == warmup:
                marks["before"] = await system.snapshot()
            elif done > warmup:
                finals.append((time.perf_counter() - started) * 1000)
                if done == total:
                    marks["after"] = await system.snapshot()

    await asyncio.gather(*(client(n) for n in range(clients)))
    before, after = marks["before"], marks["after"]
    assert isinstance(before, Snapshot) and isinstance(after, Snapshot)
    per = {part: seconds * 1000 / count for part, seconds in after.cpu_delta(before).items()}
    return Census(
        count, after.at - before.at, per, pcts(finals, (50, 99)), scale, sum(refusals.values()), idle_ms_per_s
    )


async def _idle_rates(system: BenchSystem) -> dict[str, float]:
    """CPU ms per second of the shared parts while the gateway idles: nothing in progress, and
    the relay back to its slow poll (worker.relay.BUSY_SECONDS after its last publish)."""
    assert system.conn is not None
    while await system.conn.fetchval("SELECT EXISTS (SELECT FROM payments WHERE status = ANY($1))", list(IN_PROGRESS)):
        await asyncio.sleep(0.2)
    await asyncio.sleep(BUSY_SECONDS)
    quiet = await system.snapshot()
    await asyncio.sleep(IDLE_SECONDS)
    idle = (await system.snapshot()).cpu_delta(quiet)
    return {p: idle[p] * 1000 / IDLE_SECONDS for p in SHARED_PARTS}


async def submit(http: aiohttp.ClientSession, base: str, req: load.Request, refusals: Counter[int]) -> str | None:
    """The payment's id once accepted (429/503 counted in `refusals`, and the same request sent
    again after Retry-After, as FicMart would); None for any other answer."""
    headers = {**load.HEADERS, "Idempotency-Key": req.key}
    while True:
        async with http.post(base + req.path, data=req.body, headers=headers) as resp:
            await resp.read()
            if resp.status == 202:
                return resp.headers["Location"].rsplit("/", 1)[-1]
            if resp.status in REFUSED:  # the same request again, as FicMart would
                refusals[resp.status] += 1
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            return None


async def poll(http: aiohttp.ClientSession, base: str, payment_id: str, wait: int = WAIT) -> str:
    """The payment's status after a long poll of up to `wait` seconds."""
    async with http.get(f"{base}/v1/payments/{payment_id}", params={"wait": str(wait)}, headers=load.HEADERS) as resp:
        body = await resp.read()
        if resp.status != 200:
            await asyncio.sleep(0.1)
            return "pending"
        return orjson.loads(body)["status"]


@dataclass
class Overload:
    capacity: float  # completed/s, closed loop, just before: see capacity()
    offered: float  # requests/s actually sent
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    accepted_ms: dict[float, float] = field(default_factory=dict)
    refused_ms: dict[float, float] = field(default_factory=dict)
    refusals_without_retry_after: int = 0
    settled: int = 0
    accepted: int = 0
    generator_late_ms: float = 0.0  # p99 of how late the load generator sent: part of every latency
    # accepted / seconds from the window's start until the last of them was final
    goodput: float = float("nan")
    last_final_after_s: float = float("nan")  # seconds after the window's end the last accepted was final
    # seconds after the window's start by which 50/90/99% of the accepted were final: a slow
    # drain moves them all, a few stragglers (a command gone round a retry queue) only the last
    final_after_s: dict[float, float] = field(default_factory=dict)
    # one line per second from the window's start until all are final: payments finished in
    # it, and each part's CPU in it (percent of one core): where the cores went meanwhile
    timeline: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    # one line per second of the window, by when requests were due: how many were accepted and
    # refused, and their p99 ms (when in the window the latency grew, and when it came back)
    by_second: list[tuple[int, int, float, int, float]] = field(default_factory=list)

    def table(self) -> str:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items(), key=str))
        return "\n".join(
            [
                f"capacity of one API process (closed loop, to final): {self.capacity:,.0f}/s; "
                f"offered {self.offered:,.0f}/s open loop ({self.offered / self.capacity:.1f}x) "
                f"for {self.seconds:.0f} s",
                f"answers: {answers}; refusals without Retry-After: {self.refusals_without_retry_after}",
                f"accepted p50 {self.accepted_ms.get(50, float('nan')):.1f} / p99 "
                f"{self.accepted_ms.get(99, float('nan')):.1f} ms; refused p50 "
                f"{self.refused_ms.get(50, float('nan')):.1f} / p99 {self.refused_ms.get(99, float('nan')):.1f} ms",
                f"accepted {self.accepted}, settled afterwards {self.settled}, the last "
                f"{self.last_final_after_s:.1f} s after the window; goodput {self.goodput:,.0f}/s = "
                f"{self.goodput / self.capacity:.2f}x capacity",
                "final by (s after the window's start): "
                + ", ".join(f"{p:g}% {s:.1f}" for p, s in self.final_after_s.items()),
                f"the load generator sent p99 {self.generator_late_ms:.1f} ms late (counted in the latencies)",
                "second: finished, CPU % of a core per part",
                *(
                    f"  {at:5.1f}: {finished:5d}  " + " ".join(f"{part} {pct:3.0f}" for part, pct in cpu.items())
                    for at, finished, cpu in self.timeline
                ),
                "second due: accepted (p99 ms), refused (p99 ms)",
                *(
                    f"  {second:3d}: {accepted:5d} ({accepted_p99:6.0f})  {refused:5d} ({refused_p99:6.0f})"
                    for second, accepted, accepted_p99, refused, refused_p99 in self.by_second
                ),
            ]
        )


class Timeline:
    """Samples, once a second, how many of the accepted are final and each part's CPU; the
    overload waits on its count for the accepted to settle."""

    def __init__(self, system: BenchSystem, accepted: list[str], started: float):
        self.system, self.accepted, self.started = system, accepted, started
        self.lines: list[tuple[float, int, dict[str, float]]] = []
        self.finished = 0  # of the accepted, final at the last sample
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        assert self.system.conn is not None
        before = await self.system.snapshot()
        while True:
            await asyncio.sleep(1.0)
            now = await self.system.snapshot()
            done = await self.system.conn.fetchval(
                "SELECT count(*) FROM payments WHERE id = ANY($1) AND status <> 'pending'", self.accepted
            )
            seconds = now.at - before.at
            try:
                cpu = {part: 100 * used / seconds for part, used in sorted(now.cpu_delta(before).items())}
            except CostUnknown:  # a backend ended within the second: that line shows no CPU
                cpu = {}
            self.lines.append((now.at - self.started, done - self.finished, cpu))
            before, self.finished = now, done

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[tuple[float, int, dict[str, float]]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.lines


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The load generator's garbage collector off while it sends: with tens of thousands of
    requests in flight a full collection stopped it for tens of milliseconds, and every request
    due meanwhile went late, a delay the gateway would be charged with."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def warm_up(system: BenchSystem, http: aiohttp.ClientSession, cards: list[dict]) -> None:
    """A restarted API opens its database connections and prepares its statements as requests
    first need them: a second of submits at a modest pace first, so that what is measured is
    an API in service, not one starting."""
    await load.open_loop(http, system.api_url, load.authorize_source("warm", cards), 200.0, 1.0)


async def capacity(system: BenchSystem, http: aiohttp.ClientSession, cards: list[dict]) -> float:
    """Authorizations/s one API process takes for good: what the gateway completes with 64
    clients that submit and long-poll to final (the census's loop), the bench's bounds lifted.
    Faster than this, the backlog only grows: a burst of 202s would be no capacity."""
    result = await census(
        system, http, cards, clients=64, count=2000, warmup=300, scale={"api": 1, "relay": 1, "worker": 1}
    )
    return result.rate


class Answered(NamedTuple):
    """One request of the overload, as its client saw it."""

    ms: float  # from when it was due until its answer
    status: int | str  # HTTP status, or the client exception's name
    retry_after: str | None
    due: float  # seconds after the window's start


def by_second(samples: list[Answered]) -> list[tuple[int, int, float, int, float]]:
    """Per second of due time: accepted, their p99 ms, refused, their p99 ms."""
    seconds: dict[int, tuple[list[float], list[float]]] = {}
    for sample in samples:
        accepted, refused = seconds.setdefault(int(sample.due), ([], []))
        if sample.status == 202:
            accepted.append(sample.ms)
        elif sample.status in REFUSED:
            refused.append(sample.ms)
    return [
        (second, len(a), pcts(a, (99,))[99] if a else 0.0, len(r), pcts(r, (99,))[99] if r else 0.0)
        for second, (a, r) in sorted(seconds.items())
    ]


async def overload(
    system: BenchSystem,
    cards: list[dict],
    *,
    capacity: float,
    factor: float,
    seconds: float,
    settle_timeout: float,
    connections: int,
) -> Overload:
    samples: list[Answered] = []
    accepted: list[str] = []
    late: list[float] = []  # ms each request started after it was due: the generator's own lag

    async def one(req: load.Request, due: float) -> None:
        late.append((time.perf_counter() - due) * 1000)
        headers = {**load.HEADERS, "Idempotency-Key": req.key}
        try:
            answer = await pool.post(req.path, req.body, headers)
            status: int | str = answer.status
            retry_after = answer.headers.get("retry-after")
            if answer.status == 202:
                accepted.append(answer.headers["location"].rsplit("/", 1)[-1])
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            status, retry_after = type(exc).__name__, None
        samples.append(Answered((time.perf_counter() - due) * 1000, status, retry_after, due - started))

    source = load.authorize_source("over", cards)
    # FicMart's HTTP client keeps a pool of connections; a request finding none free waits
    # for one, and that wait counts in its latency (measured from when it was due). A lean
    # client (bench/rawhttp.py), so that the load takes as little as it can of the CPU the
    # processes under test share with it.
    api = urlsplit(system.api_url)
    pool = rawhttp.Pool(api.hostname or "127.0.0.1", api.port or 80, connections)
    await pool.connect()
    rate = capacity * factor
    with collector_paused():
        started, started_wall = time.perf_counter(), time.time()
        timeline = Timeline(system, accepted, started)
        timeline.start()
        tasks = []
        for i in range(int(rate * seconds)):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(source(i), due)))
        sent_seconds = time.perf_counter() - started
        await asyncio.gather(*tasks)
    await pool.close()
    result = Overload(capacity=capacity, offered=len(tasks) / sent_seconds, seconds=sent_seconds)
    result.statuses = Counter(s.status for s in samples)
    result.accepted_ms = pcts([s.ms for s in samples if s.status == 202], (50, 99))
    result.refused_ms = pcts([s.ms for s in samples if s.status in REFUSED], (50, 99))
    result.refusals_without_retry_after = sum(1 for s in samples if s.status in REFUSED and not s.retry_after)
    result.by_second = by_second(samples)
    result.accepted = len(accepted)
    result.generator_late_ms = pcts(late, (99,))[99]
    deadline = time.monotonic() + settle_timeout
    while timeline.finished < len(accepted) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    result.timeline = await timeline.stop()
    result.settled = timeline.finished
    assert system.conn is not None
    finals = await system.conn.fetchval(
        "SELECT array_agg(extract(epoch FROM updated_at)::float8 ORDER BY updated_at) FROM payments"
        " WHERE id = ANY($1) AND status <> 'pending'",
        accepted,
    )
    last_final = finals[-1] if finals else None
    if finals:
        result.final_after_s = {
            p: finals[min(len(finals) - 1, int(len(finals) * p / 100))] - started_wall for p in (50, 90, 99)
        }
    if last_final is not None and accepted:
        result.goodput = len(accepted) / (last_final - started_wall)
        result.last_final_after_s = last_final - started_wall - sent_seconds
    return result
