"""A circuit breaker in front of the bank: a pure state machine; time comes from an injected clock.

    CLOSED     calls go out and every result is recorded. It opens when the bank fails
               systematically:
               - within the last `window` seconds at least `min_operations` operations were
                 tried and at least `failure_ratio` of them failed (5xx, timeout, no
                 connection; each operation counts once, with its latest result), or
               - `unreachable_operations` different operations in a row could not reach the
                 bank at all (refused, reset, timeout) with no answer from it in between.
               One operation failing again and again cannot open it: that is the operation's
               problem, which the retry ladder and the dead-letter queue handle.
    OPEN       no calls. Every `probe_interval` seconds somebody probes the bank's GET
               /health (probe_wait(), probed()); a healthy answer -> HALF_OPEN.
               trip() opens it at once (a failed health check seen elsewhere).
    HALF_OPEN  up to `trial_calls` real calls at a time; `trial_calls` successes -> CLOSED,
               any failure -> OPEN again.

Every call needs a Permit (acquire()); its result goes back with record() (or cancel() when
the call was not made after all). A result that comes back after the state has changed
since its permit was given (a call started before the breaker opened) is not counted.

A 4xx answer is a working bank saying no: a success here. judge() says which outcomes count.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateway.domain import BankOutcome


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Failure(StrEnum):
    ERROR = "error"  # the bank answered, with a 5xx (or a proxy's unreadable 5xx page)
    UNREACHABLE = "unreachable"  # no answer: connection refused or reset, timeout


def judge(outcome: BankOutcome) -> Failure | None:
    """What one bank outcome says about the bank's health (None: it works)."""
    if outcome.kind in ("timeout", "connection", "unreachable"):
        return Failure.UNREACHABLE
    if outcome.http_status is not None and outcome.http_status >= 500:
        return Failure.ERROR
    return None


@dataclass(frozen=True)
class Policy:
    window: float = 10.0
    min_operations: int = 20
    failure_ratio: float = 0.5
    unreachable_operations: int = 5
    probe_interval: float = 1.0
    trial_calls: int = 3


@dataclass(frozen=True)
class Permit:
    source: str  # the operation the call is for
    trial: bool  # given while half-open
    epoch: int  # the breaker's state change count when it was given


# (old state, new state, why)
Listener = Callable[[State, State, str], None]


class CircuitBreaker:
    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic, on_change: Listener | None = None):
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self.times_opened = 0
        self._epoch = 0
        # CLOSED: operation -> (when, failed) of its latest result, oldest first
        self._recent: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._recent_failed = 0
        self._unreachable: set[str] = set()  # operations that failed to connect since the last answer
        # OPEN
        self._next_probe = 0.0
        # HALF_OPEN
        self._trials = 0
        self._trial_successes = 0

    @property
    def is_open(self) -> bool:
        """True while calls are held back (open or half-open): for logs and metrics."""
        return self.state is not State.CLOSED

    # ---- calls ----------------------------------------------------------------------------

    def acquire(self, source: str) -> Permit | None:
        """A permit for one call for `source`, or None while calls are held back."""
        if self.state is State.CLOSED:
            return Permit(source, trial=False, epoch=self._epoch)
        if self.state is State.HALF_OPEN and self._trials < self.policy.trial_calls:
            self._trials += 1
            return Permit(source, trial=True, epoch=self._epoch)
        return None

    def cancel(self, permit: Permit) -> None:
        """The call was not made after all (the operation could not be claimed, ...)."""
        if permit.trial and permit.epoch == self._epoch:
            self._trials -= 1

    def record(self, permit: Permit, failure: Failure | None) -> None:
        if permit.epoch != self._epoch:
            return  # started before the last change: says nothing about the bank as it is now
        if permit.trial:
            self._trials -= 1
            if failure is not None:
                self._open(f"a trial call failed ({failure.value})")
                return
            self._trial_successes += 1
            if self._trial_successes >= self.policy.trial_calls:
                self._change(State.CLOSED, f"{self._trial_successes} trial calls succeeded")
            return
        self._remember(permit.source, failure)

    def _remember(self, source: str, failure: Failure | None) -> None:
        now = self._clock()
        previous = self._recent.pop(source, None)
        if previous is not None and previous[1]:
            self._recent_failed -= 1
        self._recent[source] = (now, failure is not None)
        self._recent_failed += failure is not None
        while self._recent:
            oldest, (at, failed) = next(iter(self._recent.items()))
            if at >= now - self.policy.window:
                break
            del self._recent[oldest]
            self._recent_failed -= failed

        if failure is Failure.UNREACHABLE:
            self._unreachable.add(source)
        else:
            self._unreachable.clear()  # the bank answered

        tried = len(self._recent)
        if len(self._unreachable) >= self.policy.unreachable_operations:
            self._open(f"{len(self._unreachable)} operations in a row could not reach the bank")
        elif tried >= self.policy.min_operations and self._recent_failed >= self.policy.failure_ratio * tried:
            self._open(f"{self._recent_failed} of {tried} operations failed within {self.policy.window:g} s")

    # ---- probing while open -------------------------------------------------------------------

    def probe_wait(self) -> float | None:
        """While open: seconds until the next health probe is due (<= 0: now). Otherwise None."""
        if self.state is not State.OPEN:
            return None
        return self._next_probe - self._clock()

    def probed(self, healthy: bool) -> None:
        """The result of a health probe."""
        if self.state is not State.OPEN:
            return
        if healthy:
            self._change(State.HALF_OPEN, "the bank's health check answered")
        else:
            self._next_probe = self._clock() + self.policy.probe_interval

    def trip(self, why: str) -> None:
        """Open now: the bank was found down by other means (its health check failed)."""
        if self.state is not State.OPEN:
            self._open(why)

    # ---- transitions ----------------------------------------------------------------------------

    def _open(self, why: str) -> None:
        self.times_opened += 1
        self._next_probe = self._clock() + self.policy.probe_interval
        self._change(State.OPEN, why)

    def _change(self, state: State, why: str) -> None:
        old, self.state = self.state, state
        self._epoch += 1
        self._recent.clear()
        self._recent_failed = 0
        self._unreachable.clear()
        self._trials = self._trial_successes = 0
        if self._on_change is not None:
            self._on_change(old, state, why)
