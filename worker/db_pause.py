"""Pausing a worker's handlings after the database (or the broker) failed one: none starts
until a probe of the database answers, with the probes backing off exponentially, instead of
every command spinning through the queue while the database is away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway import logs, process

log = logs.get("worker")


class DatabasePause:
    """Shared by the handlings of one worker: after one failed on the database (or the broker),
    none starts until `probe` answers. Probes back off exponentially, and so does the first
    probe of each new round while handlings keep failing although the probe answers."""

    def __init__(
        self, probe: Callable[[], Awaitable[object]], stopping: asyncio.Event, *, first: float = 0.5, cap: float = 30.0
    ):
        self._probe = probe
        self._stopping = stopping
        self._first = first
        self._cap = cap
        self.paused = False
        self._rounds = 0  # pauses since the last handling that went through
        self._probing = False
        self._changed = asyncio.Event()

    def failed(self) -> None:
        if not self.paused:
            self.paused = True
            self._rounds += 1

    def succeeded(self) -> None:
        self._rounds = 0

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def ready(self) -> bool:
        """Wait while paused; False when the worker is stopping instead."""
        while self.paused and not self._stopping.is_set():
            if self._probing:
                changed = self._changed
                await process.wait(changed, self._cap)
                continue
            self._probing = True
            try:
                await self._probe_until_answered()
            finally:
                self._probing = False
                self.notify()
        return not self._stopping.is_set()

    async def _probe_until_answered(self) -> None:
        failures = self._rounds
        while not self._stopping.is_set():
            delay = process.backoff_delay(failures, first=self._first, cap=self._cap)
            log.warning("database or broker failed a handling; pausing before the next probe", pause=round(delay, 2))
            if await process.wait(self._stopping, delay):
                return
            try:
                await self._probe()
            except Exception as exc:
                failures += 1
                log.warning("database probe failed", error=type(exc).__name__, detail=str(exc)[:200])
                continue
            self.paused = False
            log.info("database answers again; handling resumes")
            return
