"""The mock bank's test API (/_mock/*, documented in mockbank/mock_api.py), for tests, bench and `make run`.

    async with MockBankClient("http://127.0.0.1:8787") as bank:   # or MockBankClient(url, session)
        await bank.chaos(failure_rate=0.4, down=False)   # change switches; chaos() alone reads them
        ledger = await bank.ledger("touched")            # the books: accounts, holds, captures, ...
        fault = await bank.arm_fault(action="error", path="/api/v1/captures", status=400,
                                     body={"error": "authorization_already_used", "message": "x"})
        await bank.faults(); await bank.clear_faults()
        await bank.expire(authorization_id)              # the hold lapses now
        await bank.forget_idempotency()                  # as if 24 hours had passed
        cards = await bank.extra_accounts(20)            # generated accounts, with card data
        await bank.reset()                               # start-up balances, chaos and no faults

Every call checks the status the mock documents and raises MockBankError
(an AssertionError, so a test fails with the answer in the message) on any
other. The contract suite tests these endpoints' error answers with its own
raw client (tests/contract/bankclient.py); everyone else uses this one.
"""

from __future__ import annotations

from typing import Any

import aiohttp

__all__ = ["MockBankClient", "MockBankError", "api_card"]

TEST_ACCOUNTS = 4  # the contract's four test cards come first in /_mock/accounts


class MockBankError(AssertionError):
    """The mock answered something other than the documented status."""


def api_card(account: dict) -> dict:
    """A /_mock/accounts entry as the gateway's API takes a card."""
    return {
        "number": account["card_number"],
        "cvv": account["cvv"],
        "expiry_month": account["expiry_month"],
        "expiry_year": account["expiry_year"],
    }


class MockBankClient:
    def __init__(self, url: str, session: aiohttp.ClientSession | None = None):
        """``url``: the bank's base URL. Without ``session`` the client opens its own (close() it)."""
        self.url = url.rstrip("/")
        self._session = session
        self._owns_session = session is None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> MockBankClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, method: str, path: str, *, body: Any = None, params: dict | None = None, expect: int = 200
    ) -> Any:
        async with self.session.request(method, f"{self.url}{path}", json=body, params=params) as resp:
            data = await resp.json(content_type=None)
            if resp.status != expect:
                raise MockBankError(f"{method} {path}: HTTP {resp.status} {data}")
            return data

    # ---- reading the books

    async def ledger(self, accounts: str = "all") -> dict:
        """GET /_mock/ledger: accounts ("all", or "touched": the test accounts and those with a
        hold), authorizations, captures, voids, refunds, chaos and stats."""
        return await self._call("GET", "/_mock/ledger", params={"accounts": accounts})

    async def accounts(self, offset: int = 0, limit: int | None = None) -> list[dict]:
        """GET /_mock/accounts: accounts with full card data (card_number, cvv, expiry)."""
        params = {"offset": offset} if limit is None else {"offset": offset, "limit": limit}
        return (await self._call("GET", "/_mock/accounts", params=params))["accounts"]

    async def extra_accounts(self, count: int) -> list[dict]:
        """``count`` generated accounts (MOCKBANK_EXTRA_ACCOUNTS, big balances); fewer is an error."""
        found = [a for a in await self.accounts(TEST_ACCOUNTS, count) if a["kind"] == "extra"]
        if len(found) < count:
            raise MockBankError(f"{len(found)} generated accounts, {count} wanted: see MOCKBANK_EXTRA_ACCOUNTS")
        return found

    # ---- switches

    async def chaos(self, **changes: Any) -> dict:
        """Without arguments: the chaos switches (min/max_latency_ms, failure_rate,
        response_loss_rate, down). With some: PUT them and return the new state."""
        if not changes:
            return await self._call("GET", "/_mock/chaos")
        return await self._call("PUT", "/_mock/chaos", body=changes)

    async def arm_fault(self, **spec: Any) -> dict:
        """POST /_mock/faults: action (error|drop|lose_response|delay), path, method, times,
        delay_ms, status, body. Returns the armed fault with its id."""
        return await self._call("POST", "/_mock/faults", body=spec, expect=201)

    async def faults(self) -> list[dict]:
        """The armed faults, each with its remaining uses."""
        return (await self._call("GET", "/_mock/faults"))["faults"]

    async def clear_faults(self) -> int:
        """Disarm every fault; returns how many were armed."""
        return (await self._call("DELETE", "/_mock/faults"))["cleared"]

    # ---- time and state

    async def expire(self, authorization_id: str) -> dict:
        """Let a hold lapse now (expires_at 1 s in the past); returns its ledger entry."""
        return await self._call("POST", f"/_mock/authorizations/{authorization_id}/expire")

    async def forget_idempotency(self) -> int:
        """Forget every remembered response, as if 24 hours had passed; returns how many."""
        return (await self._call("POST", "/_mock/idempotency/expire"))["forgotten"]

    async def reset(self) -> None:
        """Start-up balances, empty books, nothing remembered, start-up chaos, no faults."""
        await self._call("POST", "/_mock/reset")
