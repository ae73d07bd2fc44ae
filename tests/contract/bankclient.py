"""HTTP client and process helpers for the bank contract suite.

BankClient speaks the contract API byte for byte (raw bodies, headers, timings);
its /_mock calls (ledger, chaos, reset, faults...) are the shared MockBankClient's.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from harness.mockbank_client import MockBankClient
from harness.procs import ScriptProcess, free_port

ZERO_CHAOS = {
    "MIN_LATENCY_MS": "0",
    "MAX_LATENCY_MS": "0",
    "FAILURE_RATE": "0",
    "RESPONSE_LOSS_RATE": "0",
    "KEY_FORGET_RATE": None,
    "KEY_LOOKUP_FAILURE_RATE": None,
    "RESPONSE_CUTOFF_SECONDS": None,
    "DB_TRANSACTION_MS": None,
    "DB_POOL_SIZE": None,
    "AUTH_EXPIRY_HOURS": None,
    "MOCKBANK_EXTRA_ACCOUNTS": None,
    "LOG_LEVEL": "info",
}

# The contract's four test accounts.
HAPPY = {"card_number": "4111111111111111", "cvv": "123", "expiry_month": 12, "expiry_year": 2030}
LIMITED = {"card_number": "4242424242424242", "cvv": "456", "expiry_month": 6, "expiry_year": 2030}
EMPTY = {"card_number": "5555555555554444", "cvv": "789", "expiry_month": 9, "expiry_year": 2030}
EXPIRED = {"card_number": "5105105105105100", "cvv": "321", "expiry_month": 3, "expiry_year": 2020}
CARDS = (HAPPY, LIMITED, EMPTY, EXPIRED)


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes
    elapsed: float

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def replayed(self) -> bool:
        return self.headers.get("X-Idempotent-Replayed") == "true"


_FRESH = object()


class BankClient(MockBankClient):
    """Thin HTTP client for the mock bank; every contract call returns a Reply."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, proc: ScriptProcess) -> None:
        super().__init__(base_url, session)
        self.base_url = base_url
        self.proc = proc

    async def request(
        self, method: str, path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        t0 = time.monotonic()
        async with self.session.request(method, self.base_url + path, data=data, headers=headers or {}) as resp:
            body = await resp.read()
            return Reply(resp.status, resp.headers, body, time.monotonic() - t0)

    async def post(self, path: str, body: Any = None, *, key: Any = _FRESH, raw: bytes | None = None) -> Reply:
        """POST JSON ``body`` (or ``raw`` bytes). ``key``: default a fresh
        Idempotency-Key, None for no header, or the key string."""
        headers = {"Content-Type": "application/json"}
        if key is _FRESH:
            key = f"test-{uuid.uuid4()}"
        if key is not None:
            headers["Idempotency-Key"] = key
        data = raw if raw is not None else json.dumps(body).encode()
        return await self.request("POST", path, data=data, headers=headers)

    async def get(self, path: str) -> Reply:
        return await self.request("GET", path)

    async def authorize(self, card: dict = HAPPY, amount: int = 1000, *, key: Any = _FRESH, **overrides: Any) -> Reply:
        return await self.post("/api/v1/authorizations", {**card, "amount": amount, **overrides}, key=key)

    async def capture(self, auth_id: Any, amount: Any, *, key: Any = _FRESH) -> Reply:
        return await self.post("/api/v1/captures", {"authorization_id": auth_id, "amount": amount}, key=key)

    async def void(self, auth_id: Any, *, key: Any = _FRESH) -> Reply:
        return await self.post("/api/v1/voids", {"authorization_id": auth_id}, key=key)

    async def refund(self, capture_id: Any, amount: Any, *, key: Any = _FRESH) -> Reply:
        return await self.post("/api/v1/refunds", {"capture_id": capture_id, "amount": amount}, key=key)

    async def account(self, card: dict) -> dict:
        last4 = card["card_number"][-4:]
        for acct in (await self.ledger())["accounts"]:
            if acct["card_last4"] == last4:
                return acct
        raise AssertionError(f"no account ending {last4}")


@contextlib.asynccontextmanager
async def running_bank(env: dict[str, str | None] | None = None) -> AsyncIterator[BankClient]:
    """Start a dedicated mockbank (zero chaos unless ``env`` says otherwise)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with ScriptProcess("mockbank", "--port", str(port), env={**ZERO_CHAOS, **(env or {})}) as proc:
        await proc.wait_http(base + "/health", timeout=20)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            yield BankClient(session, base, proc)
