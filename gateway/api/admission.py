"""Load shedding: past what it can serve with good latency, the API refuses at once.

A request under /v1 is admitted only while fewer than `max_in_flight` requests
are being worked on in this process and its event loop is keeping up: the lag
of a timer that should fire every LAG_PROBE_SECONDS, smoothed so that one
garbage collection or one large batch does not shed, stays under `max_lag`.
Otherwise it gets 503 service_unavailable with Retry-After, before its body is
read and before anything is done, so the same request with the same
Idempotency-Key may simply be sent again. When several callers share the API,
one holding its share of the work in flight already gets 429 instead, and the
others keep their room.

New work (a POST) is also refused with 503 while more than `max_backlog`
operations wait for a worker: accepting faster than the workers and the bank
finish only lengthens every payment's wait, and on shared machines takes CPU
from the workers themselves. Reads are still served then.

A long poll counts while it reads, not while it waits for a wake-up (it costs
nothing then); waiting long polls have a cap of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg

from gateway import logs

log = logs.get("gateway.api")

LAG_PROBE_SECONDS = 0.05
BACKLOG_PROBE_SECONDS = 0.25
LAG_SMOOTHING = 0.2  # weight of the newest sample: about a quarter second of memory
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Refusal:
    status: int  # 503, or 429 for a caller over its share
    code: str
    message: str
    reason: str  # metric label: overload, loop_lag, caller_share, long_polls, backlog


class Admission:
    def __init__(self, *, max_in_flight: int, max_lag: float, max_waiting: int, max_backlog: int):
        if min(max_in_flight, max_waiting, max_backlog) < 1 or max_lag <= 0:
            raise ValueError("admission limits must be positive")
        self.max_in_flight = max_in_flight
        self.max_lag = max_lag
        self.max_waiting = max_waiting
        self.max_backlog = max_backlog
        self.in_flight = 0
        self.waiting = 0
        self.lag = 0.0  # the event loop's smoothed lag, seconds
        self.backlog = 0  # operations waiting for a worker, counted up to max_backlog
        self._by_caller: Counter[str] = Counter()
        self._probes: list[asyncio.Task] = []

    def start(self, count_backlog: Callable[[int], Awaitable[int]]) -> None:
        """Start measuring: the loop's lag, and the backlog with count_backlog(max_backlog)."""
        self._probes = [
            asyncio.create_task(self._measure_lag(), name="loop-lag-probe"),
            asyncio.create_task(self._measure_backlog(count_backlog), name="backlog-probe"),
        ]

    async def close(self) -> None:
        for probe in self._probes:
            probe.cancel()
        for probe in self._probes:
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _measure_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PROBE_SECONDS
            await asyncio.sleep(LAG_PROBE_SECONDS)
            sample = max(0.0, loop.time() - due)
            self.lag += LAG_SMOOTHING * (sample - self.lag)

    async def _measure_backlog(self, count_backlog: Callable[[int], Awaitable[int]]) -> None:
        while True:
            try:
                self.backlog = await count_backlog(self.max_backlog)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The database is unreachable: requests fail on their own (503); keep the last count.
                log.debug("backlog unknown", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(BACKLOG_PROBE_SECONDS)

    def refusal(self, caller: str, *, adds_work: bool) -> Refusal | None:
        """Why a new request of `caller` is refused right now, or None to admit it. `adds_work`:
        it may start a bank operation (a POST)."""
        if adds_work and self.backlog >= self.max_backlog:
            return Refusal(
                503, "service_unavailable", "the gateway has more work waiting than it takes; retry later", "backlog"
            )
        lagging = self.lag >= self.max_lag
        if self.in_flight < self.max_in_flight and not lagging:
            return None
        # At capacity: each caller's fair share is an equal part of max_in_flight. Whoever holds
        # its share already is told it is its own doing (429); a caller below its share keeps its
        # room unless the loop itself is behind. That lets in_flight pass max_in_flight, by at
        # most max_in_flight, since only callers below their share are let in.
        callers = len(self._by_caller.keys() | {caller})
        mine = self._by_caller[caller]
        if callers > 1 and mine * callers >= self.max_in_flight:
            return Refusal(
                429, "too_many_requests", "this API key has more than its share of requests in flight", "caller_share"
            )
        if callers > 1 and not lagging:
            return None
        reason = "loop_lag" if lagging else "overload"
        return Refusal(503, "service_unavailable", "the gateway is at capacity; retry later", reason)

    def _count(self, caller: str, n: int) -> None:
        self.in_flight += n
        left = self._by_caller[caller] + n
        if left:
            self._by_caller[caller] = left
        else:
            del self._by_caller[caller]

    @contextlib.contextmanager
    def working(self, caller: str) -> Iterator[None]:
        self._count(caller, 1)
        try:
            yield
        finally:
            self._count(caller, -1)

    def wait_refusal(self) -> Refusal | None:
        if self.waiting < self.max_waiting:
            return None
        return Refusal(503, "service_unavailable", "too many long polls are waiting; retry later", "long_polls")

    @contextlib.contextmanager
    def parked(self, caller: str) -> Iterator[None]:
        """A long poll waiting for a wake-up: not work in flight while it waits."""
        self._count(caller, -1)
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1
            self._count(caller, 1)
