"""What every long-running process does the same way: the event loop, signals, start-up retries.

    process.run(serve)       serve(stop) on uvloop (when installed), the garbage collector tuned
                             for a server; SIGTERM and SIGINT set `stop`, and serve() decides
                             how to wind down
    process.started()        start-up is over: what it made is frozen out of the collector
    await process.start_with_retries(start, what=..., stop=stop)
                             start() again and again with exponential backoff until it works,
                             `stop` is set, or the attempts run out
    process.give_way(nice)   lower this process's CPU priority (relay, worker, mock bank)
    process.supervise(n, serve_one)
                             fork n processes that each run serve_one(index); pass SIGTERM/SIGINT on,
                             and stop them all when one of them ends (gateway-api --workers)

Used by gateway-api, gateway-relay, gateway-worker and mockbank.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway import logs

log = logs.get("process")

T = TypeVar("T")


def run(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run serve(stop) to its end; a SIGTERM or SIGINT sets `stop` (it does not cancel anything)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


# A request allocates thousands of containers, nearly all freed by reference counting; at
# Python's default threshold (700) the cyclic collector still ran every few requests and
# took 4-6% of each process's CPU under load (py-spy --native, bench closed-64). Fewer young
# collections, and start-up's objects frozen (started()), bring it under 0.5%. Cycles are
# still collected.
GC_YOUNG_THRESHOLD = 20_000


def started() -> None:
    """Start-up is over. What it made (modules, settings, pools, the app) lives as long as the
    process: out of the collector's sight, a full collection no longer walks it, and the pauses
    it makes every answer wait (about 100 ms under load in the API) shrink to what the work
    allocates."""
    gc.collect()
    gc.freeze()


def supervise(workers: int, serve_one: Callable[[int], None]) -> int:
    """Fork `workers` processes running serve_one(index), index 0 to workers - 1, and wait for
    them; returns the exit code.

    The parent only supervises: a SIGTERM or SIGINT it gets is passed to every child, and when
    one child ends (by itself, or killed) the others are stopped too, so that whatever runs
    the parent (a container, systemd, a test harness) sees the service as down and restarts it.
    """
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # the child: serve, and never return into the parent's code
            logs.bind(pid=os.getpid())
            code = 0
            try:
                serve_one(index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported, and this child ends
                log.exception("worker process failed")
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    log.info("serving with worker processes", workers=workers, pids=children)

    def pass_on(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pass_on)
    code = 0
    left = set(children)
    while left:
        pid, status = os.wait()
        if pid not in left:
            continue
        left.discard(pid)
        code = code or os.waitstatus_to_exitcode(status)
        pass_on(signal.SIGTERM, None)  # one is gone: the service is down, stop the rest
    return abs(code)


def give_way(nice: int) -> None:
    """Let the processes that answer people (the API, PostgreSQL) go first when CPU is short:
    run this one at `nice` (0-19; never raised back, which needs privilege). Linux shares the CPU
    between sessions before it looks at nice values inside one (autogroup), so a process leading
    its own session (started with setsid, as the tests, the bench and `make run` start ours) sets
    its session's nice too; one sharing a session leaves that alone, not to slow its neighbours.
    In containers the CPU is shared between cgroups instead: compose.yaml sets cpu_shares."""
    if nice <= 0:
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    if os.getsid(0) != os.getpid():
        return
    with contextlib.suppress(OSError, ValueError, IndexError):
        autogroup = Path("/proc/self/autogroup")  # "/autogroup-42 nice 0"; absent without autogroup
        if int(autogroup.read_text().split()[-1]) < nice:
            autogroup.write_text(str(nice))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for Windows
        return None
    return uvloop.new_event_loop


def backoff_delay(failures: int, *, first: float, cap: float) -> float:
    """The pause after `failures` failures in a row: doubling from `first` up to `cap`, jittered
    (half to all of it) so that many processes or tasks do not retry in step."""
    return min(cap, first * 2 ** max(0, min(failures - 1, 30))) * random.uniform(0.5, 1.0)


async def wait(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; True if it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, timeout))
    return event.is_set()


async def start_with_retries(
    start: Callable[[], Awaitable[T]],
    *,
    what: str,
    stop: asyncio.Event | None = None,
    attempts: int | None = None,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    first_delay: float = 0.5,
    max_delay: float = 30.0,
    undo: Callable[[], Awaitable[object]] | None = None,
) -> T | None:
    """start() until it returns (its result), `stop` is set (None) or `attempts` failed (the
    last error is raised). `undo` cleans up after a failed start before the next one."""
    failures = 0
    while stop is None or not stop.is_set():
        try:
            return await start()
        except retry_on as exc:  # the database or the broker is not up yet
            failures += 1
            if undo is not None:
                await undo()
            if attempts is not None and failures >= attempts:
                raise
            delay = backoff_delay(failures, first=first_delay, cap=max_delay)
            log.warning(
                f"{what} cannot start yet",
                error=type(exc).__name__,
                detail=str(exc)[:200],
                attempt=failures,
                retry_in=round(delay, 2),
            )
            if stop is None:
                await asyncio.sleep(delay)
            else:
                await wait(stop, delay)
    return None
