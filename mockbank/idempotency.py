"""The mock bank's idempotency memory: the 2xx responses it replays for a repeated
(Idempotency-Key, path), for 24 hours, as the upstream bank does (docs/bank.md). Apart from
the books (mockbank.ledger): the server writes a response here after the operation's commit,
as a step of its own that chaos can skip (mockbank.bank_api, step 12)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0


@dataclass
class StoredResponse:
    status: int
    body: bytes
    stored_at: float  # monotonic seconds
    stored_at_wall: datetime


class IdempotencyStore:
    """Remembered 2xx responses per (Idempotency-Key, path), dropped after a TTL.

    No in-flight lock: ``get`` misses for a key whose first request is still
    running, so both requests execute. When both succeed, the response stored
    first is kept (later ones do not overwrite it).
    """

    def __init__(
        self,
        ttl_seconds: float = IDEMPOTENCY_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl_seconds
        self.clock = clock
        self._entries: dict[tuple[str, str], StoredResponse] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, path: str) -> StoredResponse | None:
        entry = self._entries.get((key, path))
        if entry is None:
            return None
        if self.clock() - entry.stored_at >= self.ttl:
            del self._entries[(key, path)]
            return None
        return entry

    def put(self, key: str, path: str, status: int, body: bytes) -> None:
        if not 200 <= status < 300:
            return  # errors are never remembered
        existing = self.get(key, path)
        if existing is None:
            self._entries[(key, path)] = StoredResponse(status, body, self.clock(), datetime.now(UTC))

    def sweep(self) -> int:
        """Delete expired entries; returns how many were deleted."""
        now = self.clock()
        dead = [k for k, e in self._entries.items() if now - e.stored_at >= self.ttl]
        for k in dead:
            del self._entries[k]
        return len(dead)

    def forget_all(self) -> int:
        n = len(self._entries)
        self._entries.clear()
        return n
