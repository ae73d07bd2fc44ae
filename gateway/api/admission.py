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

New work (a POST) needs one of `max_new_work` slots as well, because each POST
waits for a database commit: by Little's law an accepted POST waits about
(POSTs in flight) / (POSTs committed per second), so bounding the first bounds
that wait on any machine. A POST finding every slot taken waits for one in a
short queue, after the idea of CoDel (Nichols and Jacobson; Facebook's "Fail
at Scale" applies it to server queues): a queue that drains is a burst and is
waited out, a standing one is overload and is cut short. Here a waiter waits
up to BURST_WAIT, but none at all while new work was refused for load in the
last OVERLOAD_MEMORY (a waiter went unserved, the backlog bound refused):
then the surplus is refused at once instead of queueing, and what is accepted
is not delayed. (CoDel proper calls a queue standing when it has not been
empty for an interval; the database commits POSTs in batches, which empty the
queue at every commit even in overload.)

New work is also refused with 503 while more than `max_backlog`
operations wait for a worker: accepting faster than the workers and the bank
finish only lengthens every payment's wait, and on shared machines takes CPU
from the workers themselves. Reads are still served then.

A long poll counts while it reads, not while it waits for a wake-up (it costs
nothing then); waiting long polls have a cap of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass

import asyncpg

from gateway import logs

log = logs.get("gateway.api")

LAG_PROBE_SECONDS = 0.05
BACKLOG_PROBE_SECONDS = 0.25
LAG_SMOOTHING = 0.2  # weight of the newest sample: about a quarter second of memory
RETRY_AFTER_SECONDS = 1
# The new-work queue: the longest wait for a slot, none while overloaded, that is while new
# work was refused for load (a waiter went unserved, the backlog was full) in the last
# OVERLOAD_MEMORY seconds.
BURST_WAIT = 0.015
OVERLOAD_MEMORY = 0.5


@dataclass(frozen=True)
class Refusal:
    status: int  # 503, or 429 for a caller over its share
    code: str
    message: str
    reason: str  # metric label: overload, new_work, loop_lag, caller_share, long_polls, backlog


class Refused(Exception):
    def __init__(self, refusal: Refusal):
        super().__init__(refusal.reason)
        self.refusal = refusal


OVER_SHARE = Refusal(
    429, "too_many_requests", "this API key has more than its share of requests in flight", "caller_share"
)


NO_SLOT = Refusal(503, "service_unavailable", "the gateway is taking all the new work it can; retry later", "new_work")


class Holders:
    """How many of something each caller holds, and whether one holds its share of `limit`:
    an equal part of it among the callers holding any, and the one asking."""

    def __init__(self) -> None:
        self.count = 0
        self._by_caller: Counter[str] = Counter()

    def add(self, caller: str, n: int) -> None:
        self.count += n
        left = self._by_caller[caller] + n
        if left:
            self._by_caller[caller] = left
        else:
            del self._by_caller[caller]

    def callers_with(self, caller: str, others: Collection[str] = ()) -> int:
        return len(self._by_caller.keys() | {caller, *others})

    def holds_share(self, caller: str, limit: int, others: Collection[str] = ()) -> bool:
        """Whether `caller` holds its share, `others` (callers waiting) counted among the callers."""
        callers = self.callers_with(caller, others)
        return callers > 1 and self._by_caller[caller] * callers >= limit


class WorkSlots:
    """`limit` POSTs at once, and the CoDel queue in front of them (see the module's docstring).
    A slot given back goes straight to the longest waiter, so a waiter is never overtaken."""

    def __init__(self, limit: int, *, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.holders = Holders()
        self._queued_by: Counter[str] = Counter()  # waiters still waiting, by caller
        self._clock = clock
        self._queue: deque[tuple[str, asyncio.Future[bool]]] = deque()  # may hold expired waiters
        self._refused_at = -math.inf  # when new work was last refused for load

    @property
    def used(self) -> int:
        return self.holders.count

    async def take(self, caller: str) -> Refusal | None:
        """A slot for `caller` (None), or why not; the slot is to be given back with give_back()."""
        if self.used < self.limit:  # then nobody is waiting either: see give_back()
            self.holders.add(caller, 1)
            return None
        if self.holders.holds_share(caller, self.limit, self._queued_by.keys()):
            return OVER_SHARE
        if self.overloaded:
            self.refused()
            return NO_SLOT
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        self._queue.append((caller, turn))
        self._queued_by[caller] += 1
        expiry = loop.call_later(BURST_WAIT, self._answer, caller, turn, False)
        try:
            granted = await turn
        except asyncio.CancelledError:
            if turn.cancelled():
                self._left(caller)
            elif turn.result():
                self.give_back(caller)  # handed a slot as the caller went away
            raise
        finally:
            expiry.cancel()
        if granted:
            return None
        self.refused()
        return NO_SLOT

    @property
    def overloaded(self) -> bool:
        """New work was refused for load (a waiter went unserved, the backlog was full) lately."""
        return self._clock() - self._refused_at < OVERLOAD_MEMORY

    def refused(self) -> None:
        self._refused_at = self._clock()

    @property
    def queued(self) -> int:
        """Waiters still waiting."""
        return self._queued_by.total()

    def _left(self, caller: str) -> None:
        self._queued_by[caller] -= 1
        if not self._queued_by[caller]:
            del self._queued_by[caller]

    def _answer(self, caller: str, turn: asyncio.Future[bool], granted: bool) -> None:
        if turn.done():  # answered already, or its caller went away
            return
        turn.set_result(granted)
        self._left(caller)
        if granted:
            self.holders.add(caller, 1)

    def give_back(self, caller: str) -> None:
        self.holders.add(caller, -1)
        while self._queue:
            waiter, turn = self._queue.popleft()
            if not turn.done():  # not expired, not gone
                self._answer(waiter, turn, True)
                return


class Admission:
    def __init__(self, *, max_in_flight: int, max_new_work: int, max_lag: float, max_waiting: int, max_backlog: int):
        if min(max_in_flight, max_new_work, max_waiting, max_backlog) < 1 or max_lag <= 0:
            raise ValueError("admission limits must be positive")
        self.max_in_flight = max_in_flight
        self.requests = Holders()
        self.new_work = WorkSlots(max_new_work)
        self.max_lag = max_lag
        self.max_waiting = max_waiting
        self.max_backlog = max_backlog
        self.waiting = 0
        self.lag = 0.0  # the event loop's smoothed lag, seconds
        self.backlog = 0  # operations waiting for a worker, counted up to max_backlog
        self._probes: list[asyncio.Task] = []

    @property
    def in_flight(self) -> int:
        return self.requests.count

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
        """Why a new request of `caller` is refused right now, or None to admit it (a POST still
        needs a slot: see admitted()). `adds_work`: it may start a bank operation (a POST)."""
        if adds_work and self.backlog >= self.max_backlog:
            return Refusal(
                503, "service_unavailable", "the gateway has more work waiting than it takes; retry later", "backlog"
            )
        lagging = self.lag >= self.max_lag
        if self.in_flight < self.max_in_flight and not lagging:
            return None
        # At capacity: whoever holds its share already is told it is its own doing (429); a
        # caller below its share keeps its room unless the loop itself is behind. That lets
        # in_flight pass max_in_flight, by at most max_in_flight, since only callers below their
        # share are let in.
        if self.requests.holds_share(caller, self.max_in_flight):
            return OVER_SHARE
        if self.requests.callers_with(caller) > 1 and not lagging:
            return None
        reason = "loop_lag" if lagging else "overload"
        return Refusal(503, "service_unavailable", "the gateway is at capacity; retry later", reason)

    @contextlib.asynccontextmanager
    async def admitted(self, caller: str, *, adds_work: bool) -> AsyncIterator[None]:
        """Hold room for a request for the duration of the block, or raise Refused before it."""
        refusal = self.refusal(caller, adds_work=adds_work)
        if refusal is not None:
            if adds_work and refusal.status == 503:
                self.new_work.refused()  # new work turned away: overload, no waiting for slots either
            raise Refused(refusal)
        if adds_work:
            refusal = await self.new_work.take(caller)
            if refusal is not None:
                raise Refused(refusal)
        try:
            with self.working(caller):
                yield
        finally:
            if adds_work:
                self.new_work.give_back(caller)

    @contextlib.contextmanager
    def working(self, caller: str) -> Iterator[None]:
        self.requests.add(caller, 1)
        try:
            yield
        finally:
            self.requests.add(caller, -1)

    def wait_refusal(self) -> Refusal | None:
        if self.waiting < self.max_waiting:
            return None
        return Refusal(503, "service_unavailable", "too many long polls are waiting; retry later", "long_polls")

    @contextlib.contextmanager
    def parked(self, caller: str) -> Iterator[None]:
        """A long poll waiting for a wake-up: not work in flight while it waits."""
        self.requests.add(caller, -1)
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1
            self.requests.add(caller, 1)
