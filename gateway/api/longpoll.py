"""Long polls: wait until a payment leaves its in-progress status, woken by Postgres NOTIFY.

One LISTEN connection per process on channel `payment_updated`: the statements
that take a payment out of an in-progress status notify it with the payment's
id and, when it fits, the payment as GET shows it ("<id> <json>",
payments.wake_up; an id holds no space). Each waiting request registers
under its payment id BEFORE it looks at the payment, so a change committed in
between still wakes it (no lost wake-up). A wake-up that carries the payment is
the answer, with no second read; one with the id alone makes the waiter read.

Wake-ups are passed on only once the LISTEN connection has answered a ping sent
after them. A primary shutting down for a failover ends the commits still waiting
for the standby's confirmation "locally committed", and its listening backends
deliver their notifications in that last moment: commits the new primary never
had (seen in the failover drills, tests/ha: merchants were told "authorized", then
"pending"). The backend dies before it can answer the ping; the waiters then read
again, from whichever primary serves. One ping per batch of notifications.

The usual long poll follows this process's own 202 for the payment (FicMart
submits, then waits), so the process remembers, for a little while, the
payments it accepted (pending, whose merchant) until their first wake-up: a
wait on one of those starts without reading it, since any change of it will
still wake the waiter. Nothing is ever answered from memory: what a process
does not know first-hand is read. While the LISTEN connection is down nothing
remembered is trusted, waiters fall back to re-reading once a second, and
reconnecting wakes everyone for a re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import orjson

from gateway import db, logs, store
from gateway.domain import IN_PROGRESS

log = logs.get("gateway.api.longpoll")

CHANNEL = "payment_updated"
APPLICATION_NAME = "gateway-api-listener"  # how the LISTEN connection shows in pg_stat_activity
_IN_PROGRESS = frozenset(s.value for s in IN_PROGRESS)
_FALLBACK_INTERVAL = 1.0
_REMEMBERED = 4096  # payments accepted kept (a few seconds of traffic)
# Stands for "pending, as this process accepted it": the wait starts without a read.
_PENDING: dict = {"status": "pending"}


def _remember(cache: OrderedDict, key: str, value: object) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > _REMEMBERED:
        cache.popitem(last=False)


_HEARTBEAT = 15.0


class _Waiter:
    __slots__ = ("event", "body")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.body: bytes | None = None  # the payment as the wake-up carried it


class PaymentWatcher:
    def __init__(self, dsn: str):
        self._dsn = dsn
        self._waiters: dict[str, set[_Waiter]] = {}
        self._task: asyncio.Task | None = None
        self._conn: asyncpg.Connection | None = None  # the LISTEN connection, while there is one
        self._connected = asyncio.Event()
        self._closing = False
        # payment id -> merchant: accepted here a moment ago, pending since (until a wake-up)
        self._accepted: OrderedDict[str, str] = OrderedDict()
        # ids of the last wake-ups: one may come in before the handler that accepted the
        # payment gets to say so (a busy event loop), and then it is not pending any more
        self._woken: OrderedDict[str, None] = OrderedDict()
        # wake-ups heard and not yet passed on (see the module docstring): payment id, body
        self._heard: list[tuple[str, bytes | None]] = []
        self._news = asyncio.Event()
        self._finished = 0  # wake-ups received: payments out of an in-progress status

    def finished_so_far(self) -> int | None:
        """Payments that left an in-progress status since start, as their wake-ups said (a count
        that only grows); None while not listening, when wake-ups may be missed."""
        return self._finished if self.listening else None

    def accepted(self, payment_id: str, merchant: str) -> None:
        """This process has just accepted the payment (pending): a long poll on it need not read it."""
        if self.listening and payment_id not in self._woken:
            _remember(self._accepted, payment_id, merchant)

    @property
    def listening(self) -> bool:
        return self._connected.is_set()

    @property
    def waiting(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    async def start(self, wait: float = 5.0) -> None:
        """Start listening; waits up to `wait` seconds for the first connection, then goes on in the background."""
        self._task = asyncio.create_task(self._run(), name="payment-watcher")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait)

    async def close(self) -> None:
        self._closing = True
        self._wake_all()
        if self._conn is not None and not self._conn.is_closed():
            # Ended under the task rather than by cancelling a ping in flight: a cancelled query
            # makes asyncpg send a cancel request of its own, which could outlive the shutdown.
            self._conn.terminate()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 2)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, payment_id: str) -> Iterator[_Waiter]:
        waiter = _Waiter()
        self._waiters.setdefault(payment_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(payment_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[payment_id]

    async def wait_settled(
        self,
        payment_id: str,
        merchant: str,
        read: Callable[[], Awaitable[dict | None]],
        timeout: float,
        *,
        parked: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> dict | bytes | None:
        """The merchant's payment once it is out of an in-progress status, or as it is when
        `timeout` runs out: read from the database (a dict), or as a wake-up carried it (JSON
        bytes). None when the merchant has no such payment. `parked` is entered while the
        request only waits for a wake-up (the API's admission does not count it then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self.watch(payment_id) as waiter:
            known_pending = self._accepted.get(payment_id) == merchant and self.listening
            payment = _PENDING if known_pending else await read()
            while payment is not None and payment["status"] in _IN_PROGRESS and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                listening = self.listening
                try:
                    with parked():
                        await asyncio.wait_for(
                            waiter.event.wait(), remaining if listening else min(remaining, _FALLBACK_INTERVAL)
                        )
                except TimeoutError:
                    if listening:
                        break  # no notification: the row is as we last saw it
                waiter.event.clear()
                body, waiter.body = waiter.body, None
                if body is not None and orjson.loads(body)["status"] not in _IN_PROGRESS:
                    return body
                payment = await read()
        return await read() if payment is _PENDING else payment

    # ---- the LISTEN connection ----

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        payment_id, _, text = str(payload).partition(" ")
        self._finished += 1
        body = text.encode() if text else None
        self._accepted.pop(payment_id, None)
        _remember(self._woken, payment_id, None)
        self._heard.append((payment_id, body))
        self._news.set()

    def _pass_on(self) -> None:
        """The wake-ups heard so far, to their waiters (the server has answered since)."""
        heard, self._heard = self._heard, []
        self._news.clear()
        for payment_id, body in heard:
            for waiter in self._waiters.get(payment_id, ()):
                waiter.body = body
                waiter.event.set()

    def _wake_all(self) -> None:
        # Wake-ups may have been missed: nothing remembered (or heard unconfirmed) can be
        # trusted any more.
        self._accepted.clear()
        self._heard.clear()
        self._news.clear()
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.body = None
                waiter.event.set()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing:
            conn = None
            try:
                conn = self._conn = await db.listen_connection(self._dsn, timeout=5, application_name=APPLICATION_NAME)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._notified)
                self._connected.set()
                self._wake_all()  # changes while we were not listening are only seen by re-reading
                log.info("listening for payment updates")
                backoff = 0.1
                while not lost.is_set():
                    await _first_of(lost, self._news, timeout=_HEARTBEAT)
                    if not lost.is_set():
                        news = self._news.is_set()
                        await asyncio.wait_for(store.ping(conn), 5)
                        if news and not lost.is_set():
                            self._pass_on()
                log.warning("payment listener connection lost", retry_in=backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                log.warning("payment listener down", error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
            finally:
                self._connected.clear()
                self._wake_all()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if not self._closing:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


async def _first_of(*events: asyncio.Event, timeout: float) -> None:
    """Until one of `events` is set, or `timeout` seconds."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
