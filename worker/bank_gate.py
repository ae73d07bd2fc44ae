"""The bank's availability as the concurrent handlings of one worker see it: the circuit
breaker (worker/breaker.py, a pure state machine) made asynchronous. Handlings wait here for
a permit while the breaker holds bank calls back, and one of them probes the bank's GET /health
when a probe is due."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway import logs, process
from gateway.domain import BankOutcome
from worker.breaker import CircuitBreaker, Permit, Policy, State, judge
from worker.ports import Bank
from worker.settings import WorkerSettings

log = logs.get("worker")


def policy(cfg: WorkerSettings) -> Policy:
    """The breaker's thresholds, from the worker's settings (BREAKER_*)."""
    return Policy(
        window=cfg.breaker_window,
        min_operations=cfg.breaker_min_operations,
        failure_ratio=cfg.breaker_failure_ratio,
        unreachable_operations=cfg.breaker_unreachable_operations,
        probe_interval=cfg.breaker_probe_interval,
        trial_calls=cfg.breaker_trial_calls,
    )


class BankGate:
    """The circuit breaker for the concurrent handlings of one worker. A handling asks here
    for a permit before each bank call and waits while the breaker holds calls back; one of
    the waiters probes the bank's GET /health when a probe is due."""

    def __init__(
        self, policy: Policy, bank: Bank, stopping: asyncio.Event, clock: Callable[[], float] = time.monotonic
    ):
        self.breaker = CircuitBreaker(policy, clock, on_change=self._state_changed)
        self._bank = bank
        self._stopping = stopping
        self._changed = asyncio.Event()
        self._probing = False

    async def permit(self, source: str, hold: float) -> Permit | None:
        """A permit for a call for `source`, waiting up to `hold` seconds for the bank to be
        available again; None when that time is up or the worker is stopping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        while not self._stopping.is_set():
            permit = self.breaker.acquire(source)
            if permit is not None:
                return permit
            left = deadline - loop.time()
            if left <= 0:
                return None
            due = self.breaker.probe_wait()
            if due is not None and due <= 0 and not self._probing:
                await self._probe()
                continue
            changed = self._changed
            await process.wait(changed, min(left, due) if due is not None and due > 0 else left)
        return None

    def try_permit(self, source: str) -> Permit | None:
        """A permit now, or None (no waiting): for the next quick try of a running handling."""
        return self.breaker.acquire(source)

    def record(self, permit: Permit, outcome: BankOutcome) -> None:
        self.breaker.record(permit, judge(outcome))
        if self.breaker.state is State.HALF_OPEN:
            self.notify()  # a trial slot is free again

    def cancel(self, permit: Permit) -> None:
        self.breaker.cancel(permit)
        if self.breaker.state is State.HALF_OPEN:
            self.notify()

    async def bank_down(self) -> bool:
        """Ask the bank's health check; if it fails, open the breaker (True). For the last word
        before parking: too few operations may have failed to open the breaker, yet the bank
        may be down, and parking would then be for the outage, not for the operation."""
        if await self._healthy():
            return False
        self.breaker.trip("the bank's health check failed before an operation was parked")
        return True

    def notify(self) -> None:
        """Wake every waiter to look again (state change, free trial slot, stopping)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _probe(self) -> None:
        self._probing = True
        try:
            healthy = await self._healthy()
        finally:
            self._probing = False
        self.breaker.probed(healthy)
        self.notify()

    async def _healthy(self) -> bool:
        try:
            return await self._bank.health()
        except Exception:  # a probe that cannot be made says the same as a failed one
            return False

    def _state_changed(self, old: State, new: State, why: str) -> None:
        if new is State.OPEN:
            log.warning(
                "bank circuit breaker open: bank calls held back", reason=why, times_opened=self.breaker.times_opened
            )
        else:
            log.info(f"bank circuit breaker {new.value}", reason=why, previous=old.value)
        self.notify()
