"""The bank's HTTP contract (bank-contract.md) as a client that returns domain.BankOutcome.

Every call ends in an outcome, never an exception, for anything the network
or the bank can do: an answer we can read ("ok" / "error"), no answer in
time ("timeout"), no connection or a dropped one ("connection"), or an
answer we cannot read ("unparseable"). What an outcome MEANS is
domain.classify's business, not this module's.

Card data goes into the request body and nowhere else: not into logs, not
into outcomes, not into exception text.
"""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
import orjson

from gateway import logs, redact
from gateway.domain import BankOutcome

log = logs.get("bank")

# The field a 2xx body must carry for each call to count as that call's success.
_REQUIRED = {
    "authorize": ("authorization_id", "expires_at"),
    "capture": ("capture_id",),
    "void": ("void_id",),
    "refund": ("refund_id",),
    "get_authorization": ("authorization_id",),
    "get_capture": ("capture_id",),
    "get_refund": ("refund_id",),
}
_MAX_MESSAGE = 300
# The largest answer the bank's contract can produce is well under a kilobyte; anything
# past this bound is not read, so a runaway body cannot grow the worker's memory.
MAX_BODY_BYTES = 1 << 20


def _clean(text: object) -> str | None:
    """A bank-supplied message, short and with anything card-like removed."""
    if not isinstance(text, str):
        return None
    return redact.clean(text, _MAX_MESSAGE)


def _outcome(call: str, status: int, raw: bytes) -> BankOutcome:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if 300 <= status < 400:
        # Never followed: a redirect would resend the card, the CVV and our key to
        # wherever the Location points, and its answer would not be the bank's.
        return BankOutcome("redirect", http_status=status)
    if 200 <= status < 300:
        if isinstance(body, dict) and all(isinstance(body.get(f), str) for f in _REQUIRED[call]):
            return BankOutcome("ok", http_status=status, body=body)
        return BankOutcome("unparseable", http_status=status)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return BankOutcome(
            "error", http_status=status, code=body["error"], message=_clean(body.get("message")), body=body
        )
    # A plain-text 400, a proxy's HTML 502...: never assume an error body parses.
    return BankOutcome("unparseable", http_status=status)


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None once it is past MAX_BODY_BYTES (the rest is never read)."""
    if resp.content_length is not None and resp.content_length > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class BankClient:
    """One aiohttp session with a large connection pool, shared by every call of a worker."""

    def __init__(self, base_url: str, *, timeout: float = 20.0, max_connections: int = 1000):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BankClient:
        self._open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=self._max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(5.0, self.timeout)),
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the contract's calls ---------------------------------------------------------

    async def authorize(
        self, key: str, *, card_number: str, cvv: str, expiry_month: int, expiry_year: int, amount: int
    ) -> BankOutcome:
        body = {
            "card_number": card_number,
            "cvv": cvv,
            "expiry_month": expiry_month,
            "expiry_year": expiry_year,
            "amount": amount,
        }
        return await self._post("authorize", "/api/v1/authorizations", key, body)

    async def capture(self, key: str, *, authorization_id: str, amount: int) -> BankOutcome:
        return await self._post(
            "capture", "/api/v1/captures", key, {"authorization_id": authorization_id, "amount": amount}
        )

    async def void(self, key: str, *, authorization_id: str) -> BankOutcome:
        return await self._post("void", "/api/v1/voids", key, {"authorization_id": authorization_id})

    async def refund(self, key: str, *, capture_id: str, amount: int) -> BankOutcome:
        return await self._post("refund", "/api/v1/refunds", key, {"capture_id": capture_id, "amount": amount})

    async def get_authorization(self, authorization_id: str) -> BankOutcome:
        return await self._get("get_authorization", f"/api/v1/authorizations/{quote(authorization_id, safe='')}")

    async def get_capture(self, capture_id: str) -> BankOutcome:
        return await self._get("get_capture", f"/api/v1/captures/{quote(capture_id, safe='')}")

    async def get_refund(self, refund_id: str) -> BankOutcome:
        return await self._get("get_refund", f"/api/v1/refunds/{quote(refund_id, safe='')}")

    # ---- transport ----------------------------------------------------------------------

    async def _post(self, call: str, path: str, key: str, body: dict) -> BankOutcome:
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        return await self._send(call, "POST", path, headers, orjson.dumps(body))

    async def _get(self, call: str, path: str) -> BankOutcome:
        return await self._send(call, "GET", path, {}, None)

    async def _send(self, call: str, method: str, path: str, headers: dict, data: bytes | None) -> BankOutcome:
        session = self._open()
        try:
            async with session.request(
                method, self.base_url + path, headers=headers, data=data, allow_redirects=False
            ) as resp:
                raw = await _read_bounded(resp)
                outcome = (
                    BankOutcome("oversized", http_status=resp.status)
                    if raw is None
                    else _outcome(call, resp.status, raw)
                )
        except TimeoutError:
            outcome = BankOutcome("timeout")
        except (aiohttp.ClientError, OSError) as exc:
            # The exception names the URL at most, never the body; log its type only.
            log.debug("bank connection problem", call=call, error=type(exc).__name__)
            outcome = BankOutcome("connection")
        if outcome.kind != "ok":
            log.info(
                "bank call not ok", call=call, outcome=outcome.kind, http_status=outcome.http_status, code=outcome.code
            )
        return outcome
