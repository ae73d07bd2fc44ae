"""HTTP load from the bench process: closed loop (fixed concurrency) and open loop (fixed rate).

Folded in from the former bench/submit.py. Each request is described by a
`Request` from a source callable (`source(i) -> Request | None`, None = the
source is exhausted, e.g. no payment left to capture).

closed_loop: N clients, each sends its next request when the previous one is
answered. The run is warm-up + measured window; the counters (pg_stat, CPU)
are snapshotted at the window's edges while the load is running, so the
deltas are those of steady state.

open_loop: requests are sent on a fixed schedule whatever the answers do, and
latency is measured from the scheduled send time (no coordinated omission). Like
a real client's connection pool, at most `max_in_flight` requests are open at once
(default 512): past that, due requests wait in this process (their latency still
counts from the time they were due), so an overloaded API is not also buried
under thousands of idle connections.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.system import API_KEY, Snapshot
from bench.util import pcts, sleep_until

MAX_IN_FLIGHT = 512  # open loop: requests open at once at most (bench.run --max-in-flight)
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    key: str


@dataclass
class Sample:
    start: float  # perf_counter when sent (open loop: when it was due)
    end: float
    status: int | str  # HTTP status, or the client exception's name
    payment_id: str | None = None


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    before: Snapshot | None = None  # at the window's start
    after: Snapshot | None = None  # ... and end
    peak_in_flight: int = 0
    offered_rate: float | None = None
    by_start: bool = False  # open loop: a request belongs to the window it was due in
    waited_for_slot: int = 0  # open loop: requests that found max_in_flight requests open

    def in_window(self) -> list[Sample]:
        lo, hi = self.window
        if self.by_start:
            return [s for s in self.samples if lo <= s.start <= hi]
        return [s for s in self.samples if lo <= s.end <= hi]

    @property
    def seconds(self) -> float:
        return self.window[1] - self.window[0]

    def accepted(self) -> list[Sample]:
        return [s for s in self.in_window() if s.status == 202]

    def rate(self) -> float:
        return len(self.accepted()) / self.seconds if self.seconds > 0 else float("nan")

    def latency_ms(self) -> dict[float, float]:
        return pcts((s.end - s.start) * 1000 for s in self.accepted())

    def statuses(self) -> Counter:
        return Counter(s.status for s in self.samples)


def authorize_source(tag: str, cards: list[dict], amount: int = 5000) -> Callable[[int], Request]:
    """Authorizations spread round-robin over many generated cards (the bank serialises per card)."""
    run = uuid.uuid4().hex[:8]

    def source(i: int) -> Request:
        card = cards[i % len(cards)]
        key = f"{tag}-{run}-{i}"
        body = orjson.dumps(
            {
                "order_id": f"ord_{key}",
                "customer_id": f"cus_{tag}",
                "amount": amount,
                "currency": "USD",
                "card": {
                    "number": card["card_number"],
                    "cvv": card["cvv"],
                    "expiry_month": card["expiry_month"],
                    "expiry_year": card["expiry_year"],
                },
            }
        )
        return Request("/v1/payments", body, key)

    return source


def action_source(
    action: str, payment_ids: list[str], start: int = 0, stop: int | None = None
) -> Callable[[int], Request | None]:
    """capture/void/refund of each payment in payment_ids[start:stop], once."""
    ids = payment_ids[start:stop]
    run = uuid.uuid4().hex[:8]

    def source(i: int) -> Request | None:
        if i >= len(ids):
            return None
        return Request(f"/v1/payments/{ids[i]}/{action}", b"", f"{action}-{run}-{i}")

    return source


async def _send(session: aiohttp.ClientSession, base: str, req: Request, started: float) -> Sample:
    headers = {**HEADERS, "Idempotency-Key": req.key}
    try:
        async with session.post(base + req.path, data=req.body, headers=headers) as resp:
            await resp.read()
            end = time.perf_counter()
            pid = None
            if resp.status == 202 and req.path == "/v1/payments":
                pid = resp.headers.get("Location", "").rsplit("/", 1)[-1] or None
            return Sample(started, end, resp.status, pid)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Sample(started, time.perf_counter(), type(exc).__name__)


def session(total_timeout: float = 30.0, connections: int = 0) -> aiohttp.ClientSession:
    """An HTTP client; `connections` bounds its pool (0: a new connection whenever none is idle)."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=total_timeout))


Snap = Callable[[], Awaitable[Snapshot]]


async def closed_loop(
    http: aiohttp.ClientSession,
    base: str,
    source: Callable[[int], Request | None],
    clients: int,
    warmup: float,
    seconds: float,
    snap: Snap,
) -> LoadResult:
    """`clients` concurrent clients for warmup + seconds; the window is the last `seconds`
    (cut short when the source runs dry)."""
    result = LoadResult()
    counter = itertools.count()
    t0 = time.perf_counter()
    t_w, t_e = t0 + warmup, t0 + warmup + seconds
    exhausted = asyncio.Event()

    async def client() -> None:
        while time.perf_counter() < t_e:
            req = source(next(counter))
            if req is None:
                exhausted.set()
                return
            sample = await _send(http, base, req, time.perf_counter())
            result.samples.append(sample)

    async def marks() -> None:
        await sleep_until(t_w)
        result.before = await snap()
        lo = time.perf_counter()
        done = asyncio.ensure_future(exhausted.wait())
        try:
            await asyncio.wait([done], timeout=max(0.0, t_e - time.perf_counter()))
        finally:
            done.cancel()
        result.after = await snap()
        result.window = (lo, time.perf_counter())

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.gather(marks(), *tasks)
    result.peak_in_flight = clients
    return result


async def open_loop(
    http: aiohttp.ClientSession,
    base: str,
    source: Callable[[int], Request | None],
    rate: float,
    seconds: float,
    snap: Snap | None = None,
    warmup: float = 0.0,
    count: int | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    max_in_flight: int | None = None,
) -> LoadResult:
    """`rate` requests/s for `seconds` (or `count` requests); the window skips the first `warmup` s."""
    result = LoadResult(offered_rate=rate, by_start=True)
    total = count if count is not None else int(rate * seconds)
    interval = 1.0 / rate
    in_flight: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(max_in_flight or MAX_IN_FLIGHT)
    open_now = 0

    async def one(req: Request, due: float) -> None:
        nonlocal open_now
        if slots.locked():
            result.waited_for_slot += 1
        async with slots:
            open_now += 1
            result.peak_in_flight = max(result.peak_in_flight, open_now)
            try:
                sample = await _send(http, base, req, due)
            finally:
                open_now -= 1
        result.samples.append(sample)
        if on_sample is not None:
            on_sample(sample)

    start = time.perf_counter() + 0.01
    t_w = start + warmup
    before_task = None
    i = 0
    while i < total:
        now = time.perf_counter()
        if snap is not None and before_task is None and now >= t_w:
            before_task = asyncio.ensure_future(snap())
            lo = now
        while i < total and start + i * interval <= now:  # everything due by now (sleep resolution ~1 ms)
            req = source(i)
            if req is None:
                total = i
                break
            task = asyncio.create_task(one(req, start + i * interval))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
        if i < total:
            await sleep_until(start + i * interval)
    t_e = time.perf_counter()
    if snap is not None:
        if before_task is None:
            before_task = asyncio.ensure_future(snap())
            lo = t_e
        result.before = await before_task
        result.after = await snap()
        result.window = (lo, t_e)
    else:
        result.window = (start, t_e)
    if in_flight:
        await asyncio.gather(*in_flight)
    if snap is None:
        result.window = (start, max([t_e] + [s.end for s in result.samples]))
    return result
