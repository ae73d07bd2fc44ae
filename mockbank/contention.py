"""The upstream bank's database as a queue: a pool of connections and account row locks.

docs/bank.md: under concurrent load the upstream bank answers much later
than its injected latency, because "requests on the same card wait for each
other (the account row is locked for the whole operation), and its database
pool holds 25 connections". The mock's books are in memory and its operations
are instant, so without this module nothing ever queues.

``Database.transaction(account_id)`` stands for one operation's transaction:
it waits for one of ``pool_size`` connections, then (when ``account_id`` is
given) for that account's row lock, and holds both for ``transaction_ms``
before the caller commits. The lock is taken after the connection, as a
``SELECT ... FOR UPDATE`` is, so requests queued on one busy card keep their
connections and a burst on one card can starve every other card of the pool.

``transaction_ms = 11`` reproduces the contract's figures on the development
machine: 400 concurrent authorizations on one card with the default chaos
answered in a median of 2.7 s and at most 5.5 s (upstream: 2.6 s and 5.6 s).
Idempotency lookups do not queue: a replay is answered at once, as the
contract says.

``transaction_ms == 0`` (the default) switches it off: ``transaction`` neither
waits nor yields to the event loop, and the mock behaves as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class _RowLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders and waiters; the entry is dropped at 0


class Database:
    def __init__(self, *, pool_size: int, transaction_ms: float) -> None:
        self.transaction_s = transaction_ms / 1000.0
        self._pool = asyncio.Semaphore(pool_size)
        self._rows: dict[str, _RowLock] = {}

    @property
    def enabled(self) -> bool:
        return self.transaction_s > 0

    @contextlib.asynccontextmanager
    async def transaction(self, account_id: str | None) -> AsyncIterator[None]:
        """Hold a connection (and the account's row) for one transaction; commit inside."""
        if not self.enabled:
            yield
            return
        async with self._pool:
            if account_id is None:
                await asyncio.sleep(self.transaction_s)
                yield
                return
            async with self._row_lock(account_id):
                await asyncio.sleep(self.transaction_s)
                yield

    @contextlib.asynccontextmanager
    async def _row_lock(self, account_id: str) -> AsyncIterator[None]:
        row = self._rows.get(account_id)
        if row is None:
            row = self._rows[account_id] = _RowLock()
        row.users += 1
        try:
            async with row.lock:
                yield
        finally:
            row.users -= 1
            if row.users == 0:
                del self._rows[account_id]
