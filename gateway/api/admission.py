"""Admission: take every payment the gateway can finish, refuse at once what it cannot.

Accepting a payment means recording the intent durably; the operations waiting
for a worker are the design's buffer, and a POST simply waits for the group
commit that records it (batches grow with load). So new work (a POST) is
refused with 503 and Retry-After only when:

- the backlog would take longer than `max_time_to_final` to finish: the
  operations waiting for a worker, divided by the rate at which payments are
  finished (the long polls' wake-ups, counted over the last WINDOW seconds in
  which there was work). Below `max_in_flight` waiting operations (also the
  bound while no rate is known) nothing is refused for the backlog: a closed
  population of clients that size, each with one checkout outstanding, cannot
  overload a durable queue. A backlog
  held by an open bank circuit counts as none (the query says 0): taking
  payments while the bank is away is the point;
- the backlog is past that cushion (`max_in_flight` operations) and new work
  comes faster than work is finished: there, new work is paced to the
  completion rate and GROWTH more, after a burst of BURST_SECONDS of it. Once
  new work was refused for the backlog, the overload stands for BURST_SECONDS
  more: new work keeps to the pace below the cushion too, with no burst saved
  up, so that a backlog hovering at the bound or the cushion does not let
  seconds of pace in at the offered rate each time it dips. On a
  shared machine, accepting costs the CPU that finishing needs: a standing
  overload that filled the backlog to its bound at the offered rate took the
  cores from the relay and the worker, which then finished less than half of
  what they do in a closed loop (bench `--scenario overload`, timeline);
- `max_in_flight` requests are being worked on in this process (a memory
  bound, in thousands). A caller already holding its share then gets 429 and
  the others keep their room;
- the caller's token bucket is empty: POSTs per second per API key (429);
- the database cannot take the commit (the handler fails: 503, see middleware).

Reads are refused only by the memory bound. A long poll counts while it
reads, not while it waits for a wake-up (it costs nothing then); waiting long
polls have a cap of their own, which one caller cannot fill while others wait
(429 past its share), and a long poll whose client went away frees its place
(server.py cancels it).

Every refusal is decided before the body is read, from counters and the last
probe: one query every PROBE_SECONDS counts the backlog (up to what matters),
and the rate comes from wake-ups the process receives anyway. Retry-After says
when there should be room: the excess divided by the rate of completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass

import asyncpg

from gateway import logs

log = logs.get("gateway.api")

PROBE_SECONDS = 0.25
WINDOW = 5.0  # seconds of work over which the completion rate is measured
MIN_RETRY_AFTER = 1
BURST_SECONDS = 5.0  # a caller's bucket holds this many seconds of its rate, and so does the pace
GROWTH = 0.1  # past the cushion, the backlog may still grow by this fraction of the completion rate


@dataclass(frozen=True)
class Refusal:
    status: int  # 503, or 429 for a caller over its share or rate
    code: str
    message: str
    reason: str  # metric label: overload, caller_share, rate, backlog, long_polls
    retry_after: int = MIN_RETRY_AFTER  # seconds


class Refused(Exception):
    def __init__(self, refusal: Refusal):
        super().__init__(refusal.reason)
        self.refusal = refusal


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

    def holds_share(self, caller: str, limit: int) -> bool:
        callers = self.callers_with(caller)
        return callers > 1 and self._by_caller[caller] * callers >= limit


class CompletionRate:
    """Payments finished per second over the last `window` seconds in which there was work:
    idle time does not count, so the first seconds of a burst after a quiet spell are not
    mistaken for a slow gateway. None until there was work for a probe period."""

    def __init__(self, window: float = WINDOW):
        self._window = window
        self._periods: deque[tuple[float, int]] = deque()  # (busy seconds, finished), oldest first
        self._busy = 0.0
        self._finished = 0
        self._last: tuple[float, int] | None = None  # (when, finished so far) at the last sample

    def sample(self, now: float, finished_so_far: int, busy: bool) -> None:
        """`finished_so_far`: a count that only grows; `busy`: work was waiting since the last sample."""
        last, self._last = self._last, (now, finished_so_far)
        if last is None:
            return
        seconds, finished = now - last[0], max(0, finished_so_far - last[1])
        if not (busy or finished) or seconds <= 0:
            return
        self._periods.append((seconds, finished))
        self._busy += seconds
        self._finished += finished
        while self._busy - self._periods[0][0] >= self._window:
            old_seconds, old_finished = self._periods.popleft()
            self._busy -= old_seconds
            self._finished -= old_finished

    def forget(self) -> None:
        """The count is not to be trusted (the wake-ups were not received for a while)."""
        self._periods.clear()
        self._busy, self._finished, self._last = 0.0, 0, None

    @property
    def per_second(self) -> float | None:
        return self._finished / self._busy if self._busy > 0 else None


class TokenBucket:
    def __init__(self, rate: float, now: float):
        self.rate = rate
        self.capacity = rate * BURST_SECONDS
        self.tokens = self.capacity
        self._at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until there is one."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def keep_at_most(self, seconds: float, now: float) -> None:
        """Hold no more than `seconds` of the rate, counted up to now."""
        self._refill(now)
        self.tokens = min(self.tokens, self.rate * seconds)

    def retune(self, rate: float, now: float) -> None:
        """From now on, refill at `rate` and hold BURST_SECONDS of it."""
        self._refill(now)  # up to now at the old rate
        self.rate, self.capacity = rate, rate * BURST_SECONDS
        self.tokens = min(self.tokens, self.capacity)


class Admission:
    def __init__(
        self,
        *,
        max_in_flight: int,
        max_long_polls: int,
        max_time_to_final: float,
        post_rate: float,
        post_rates: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        rates = post_rates or {}
        if min(max_in_flight, max_long_polls) < 1 or min(max_time_to_final, post_rate, *rates.values()) <= 0:
            raise ValueError("admission limits must be positive")
        self.max_in_flight = max_in_flight
        self.max_long_polls = max_long_polls
        self.max_time_to_final = max_time_to_final
        self._post_rate = post_rate
        self._post_rates = rates
        self._buckets: dict[str, TokenBucket] = {}
        self._clock = clock
        self.requests = Holders()  # worked on now
        self.long_polls = Holders()  # waiting for a wake-up
        self.backlog = 0  # operations waiting for a worker, as the last probe counted them
        self.rate = CompletionRate()
        self._pace: TokenBucket | None = None  # new work past the cushion; None while no rate is known
        self._standing_until = float("-inf")  # an overload stands until then (see refusal)
        self._probe: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return self.requests.count

    @property
    def waiting(self) -> int:
        return self.long_polls.count

    # ---- the backlog signal ----

    def observe(self, backlog: int, finished_so_far: int | None) -> None:
        """A probe's findings: operations waiting, and the count of payments finished so far
        (None: not known, the wake-ups are not being received)."""
        busy = self.backlog > 0 or backlog > 0
        self.backlog = backlog
        now = self._clock()
        if finished_so_far is None:
            self.rate.forget()
        else:
            self.rate.sample(now, finished_so_far, busy)
        rate = self.rate.per_second
        if not rate:
            self._pace = None
        elif self._pace is None:
            self._pace = TokenBucket(rate * (1 + GROWTH), now)
        else:
            self._pace.retune(rate * (1 + GROWTH), now)

    def backlog_bound(self) -> int:
        """Waiting operations past which new work is refused: what finishes within
        max_time_to_final at the measured rate, and never fewer than max_in_flight."""
        return max(self.max_in_flight, int((self.rate.per_second or 0) * self.max_time_to_final))

    def start(self, count_backlog: Callable[[int], Awaitable[int]], finished_so_far: Callable[[], int | None]) -> None:
        """Probe every PROBE_SECONDS: count_backlog(most) counts waiting operations up to `most`."""
        self._probe = asyncio.create_task(self._measure(count_backlog, finished_so_far), name="backlog-probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _measure(
        self, count_backlog: Callable[[int], Awaitable[int]], finished_so_far: Callable[[], int | None]
    ) -> None:
        while True:
            try:
                self.observe(await count_backlog(self.backlog_bound() + 1), finished_so_far())
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The database is unreachable: requests fail on their own (503); keep the last count.
                log.debug("backlog unknown", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(PROBE_SECONDS)

    def _seconds_for(self, operations: float) -> int:
        """Retry-After for room that `operations` finished will make."""
        rate = self.rate.per_second
        if rate is None:  # nothing measured: no work lately, or the wake-ups are not received
            return MIN_RETRY_AFTER
        seconds = operations / rate if rate else self.max_time_to_final
        return max(MIN_RETRY_AFTER, min(math.ceil(seconds), math.ceil(self.max_time_to_final)))

    # ---- decisions ----

    def refusal(self, caller: str, *, adds_work: bool) -> Refusal | None:
        """Why a new request of `caller` is refused right now, or None to admit it.
        `adds_work`: it may start a bank operation (a POST)."""
        if self.in_flight >= self.max_in_flight:
            # At the memory bound: whoever holds its share already is told it is its own doing
            # (429); a caller below its share keeps its room, so in_flight may pass
            # max_in_flight by at most max_in_flight.
            if self.requests.holds_share(caller, self.max_in_flight):
                return Refusal(
                    429,
                    "too_many_requests",
                    "this API key has more than its share of requests in flight",
                    "caller_share",
                    self._seconds_for(self.requests.count - self.max_in_flight + 1),
                )
            if self.requests.callers_with(caller) == 1:
                return Refusal(
                    503,
                    "service_unavailable",
                    "the gateway is at capacity; retry later",
                    "overload",
                    self._seconds_for(self.in_flight - self.max_in_flight + 1),
                )
        if not adds_work:
            return None
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(self._post_rates.get(caller, self._post_rate), now)
        wait = bucket.take(now)
        if wait:
            return Refusal(
                429,
                "too_many_requests",
                "this API key is over its rate of new requests",
                "rate",
                max(MIN_RETRY_AFTER, math.ceil(wait)),
            )
        excess = self.backlog - self.backlog_bound()
        # Within BURST_SECONDS of the last refusal for the backlog the overload stands: new work
        # keeps to the pace even where the backlog dipped below the bound or the cushion, and the
        # pace holds no more than a probe period of its rate. Else each dip let in the seconds of
        # pace saved up meanwhile at the offered rate, a burst the API answered late.
        standing = now < self._standing_until
        if excess >= 0:
            retry_after = self._seconds_for(excess + 1)
            if self._pace is not None:
                self._pace.keep_at_most(PROBE_SECONDS, now)
        elif (
            self._pace is not None
            and (standing or self.backlog >= self.max_in_flight)
            and (paced := self._pace.take(now))
        ):
            retry_after = max(MIN_RETRY_AFTER, math.ceil(paced))
        else:
            return None
        self._standing_until = now + BURST_SECONDS
        bucket.tokens += 1  # not taken after all
        return Refusal(
            503,
            "service_unavailable",
            "the gateway has more work waiting than it can finish soon; retry later",
            "backlog",
            retry_after,
        )

    def admit(self, caller: str, *, adds_work: bool) -> Refusal | None:
        """Why a new request is refused (holding nothing), or None: then it holds room until
        release(caller). Not a context manager: a refusal for load is answered by the thousand a
        second, and one costs less without its frames."""
        refusal = self.refusal(caller, adds_work=adds_work)
        if refusal is None:
            self.requests.add(caller, 1)
        return refusal

    def release(self, caller: str) -> None:
        """The room an admitted request of `caller` held is free again."""
        self.requests.add(caller, -1)

    def wait_refusal(self, caller: str) -> Refusal | None:
        """Why `caller` may not start waiting for a wake-up now, or None."""
        if self.long_polls.holds_share(caller, self.max_long_polls):
            return Refusal(
                429,
                "too_many_requests",
                "this API key holds its share of the long polls",
                "long_polls",
                self._seconds_for(self.backlog),
            )
        if self.waiting >= self.max_long_polls:
            return Refusal(
                503,
                "service_unavailable",
                "too many long polls are waiting; retry later",
                "long_polls",
                self._seconds_for(self.backlog),
            )
        return None

    @contextlib.contextmanager
    def parked(self, caller: str) -> Iterator[None]:
        """A long poll waiting for a wake-up: not work in flight while it waits."""
        self.requests.add(caller, -1)
        self.long_polls.add(caller, 1)
        try:
            yield
        finally:
            self.long_polls.add(caller, -1)
            self.requests.add(caller, 1)
