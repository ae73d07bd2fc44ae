"""The bank's HTTP contract (docs/bank.md) as a client that returns domain.BankOutcome.

Every call ends in an outcome, never an exception, for anything the network
or the bank can do: an answer we can read ("ok" / "error"), no answer in
time ("timeout"), no connection or a dropped one ("connection"), or an
answer we cannot read ("unparseable"). What an outcome MEANS is
domain.classify's business, not this module's.

Card data goes into the request body and nowhere else: not into logs, not
into outcomes, not into exception text.

Each call is timed into worker.metrics.BankMetrics (by operation and outcome;
OPERATION, set by the consumer for the command it handles, tells a release
from a void) and runs in a span of the current trace, whose `traceparent` goes
to the bank with the request.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from gateway import answers, logs, tracing
from gateway.answers import Asked
from gateway.domain import BankOutcome, OperationKind
from worker.metrics import BankMetrics, bank_outcome

log = logs.get("bank")

# The largest answer the bank's contract can produce is well under a kilobyte; anything
# past this bound is not read, so a runaway body cannot grow the worker's memory.
MAX_BODY_BYTES = 1 << 20
REPLAYED_HEADER = "X-Idempotent-Replayed"
HEALTH_TIMEOUT = 5.0  # a probe of a bank that does not answer should not take a whole bank timeout

# The operation the current task's bank calls are for (the command being handled): a void
# call is a void or the release of a lapsed hold, which the metrics and the span tell apart.
OPERATION: ContextVar[OperationKind | None] = ContextVar("bank_operation", default=None)
_CALLS = {kind.value: kind for kind in OperationKind}


def _outcome(asked: Asked, status: int, raw: bytes, replayed: bool) -> BankOutcome:
    if 300 <= status < 400:
        # Never followed: a redirect would resend the card, the CVV and our key to
        # wherever the Location points, and its answer would not be the bank's.
        return BankOutcome("redirect", http_status=status)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if 200 <= status < 300:
        if body is None:
            return BankOutcome("unparseable", http_status=status, replayed=replayed)
        try:
            kept = answers.check_success(asked, body)
        except answers.AnswerMismatch as exc:
            return BankOutcome("malformed", http_status=status, message=str(exc), replayed=replayed)
        return BankOutcome("ok", http_status=status, body=kept, replayed=replayed)
    if isinstance(body, dict) and "error" in body:
        code, kept = answers.check_error(body)
        return BankOutcome("error", http_status=status, code=code, body=kept)
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

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 20.0,
        max_connections: int = 1000,
        metrics: BankMetrics | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.metrics = metrics or BankMetrics(CollectorRegistry())
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
        return await self._post(Asked("authorize", amount=amount), "/api/v1/authorizations", key, body)

    async def capture(self, key: str, *, authorization_id: str, amount: int) -> BankOutcome:
        asked = Asked("capture", amount=amount, authorization_id=authorization_id)
        return await self._post(
            asked, "/api/v1/captures", key, {"authorization_id": authorization_id, "amount": amount}
        )

    async def void(self, key: str, *, authorization_id: str) -> BankOutcome:
        asked = Asked("void", authorization_id=authorization_id)
        return await self._post(asked, "/api/v1/voids", key, {"authorization_id": authorization_id})

    async def refund(self, key: str, *, capture_id: str, amount: int) -> BankOutcome:
        asked = Asked("refund", amount=amount, capture_id=capture_id)
        return await self._post(asked, "/api/v1/refunds", key, {"capture_id": capture_id, "amount": amount})

    async def get_authorization(self, authorization_id: str) -> BankOutcome:
        asked = Asked("get_authorization", authorization_id=authorization_id)
        return await self._get(asked, f"/api/v1/authorizations/{quote(authorization_id, safe='')}")

    async def get_capture(self, capture_id: str) -> BankOutcome:
        return await self._get(
            Asked("get_capture", capture_id=capture_id), f"/api/v1/captures/{quote(capture_id, safe='')}"
        )

    async def get_refund(self, refund_id: str) -> BankOutcome:
        return await self._get(Asked("get_refund", refund_id=refund_id), f"/api/v1/refunds/{quote(refund_id, safe='')}")

    async def health(self) -> bool:
        """GET /health answers 200: what the worker's circuit breaker probes while it is open."""
        try:
            async with self._open().get(
                self.base_url + "/health",
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=min(HEALTH_TIMEOUT, self.timeout)),
            ) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    # ---- transport ----------------------------------------------------------------------

    async def _post(self, asked: Asked, path: str, key: str, body: dict) -> BankOutcome:
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        return await self._send(asked, "POST", path, headers, orjson.dumps(body))

    async def _get(self, asked: Asked, path: str) -> BankOutcome:
        return await self._send(asked, "GET", path, {}, None)

    async def _send(self, asked: Asked, method: str, path: str, headers: dict, data: bytes | None) -> BankOutcome:
        operation = _CALLS.get(asked.call)  # None: a read (GET)
        if operation is OperationKind.VOID and OPERATION.get() is OperationKind.RELEASE:
            operation = OperationKind.RELEASE
        label = operation.value if operation is not None else asked.call
        metrics = self.metrics
        with tracing.span(f"bank {label}", tracing.SpanKind.CLIENT) as span:
            tracing.inject(headers)
            metrics.in_flight += 1
            started = time.perf_counter()
            try:
                outcome = await self._exchange(asked, method, path, headers, data)
            finally:
                metrics.in_flight -= 1
            seconds = time.perf_counter() - started
            result = bank_outcome(operation, outcome)
            metrics.observe(label, result, seconds)
            if span.is_recording():
                span.set_attributes(
                    {"http.request.method": method, "gateway.operation": label, "gateway.bank.outcome": result}
                )
                if outcome.http_status is not None:
                    span.set_attribute("http.response.status_code", outcome.http_status)
        if outcome.kind != "ok":
            log.info(
                "bank call not ok",
                call=asked.call,
                outcome=outcome.kind,
                http_status=outcome.http_status,
                code=outcome.code,
                problem=outcome.message if outcome.kind == "malformed" else None,
                answer=outcome.body if outcome.kind == "error" else None,
            )
        return outcome

    async def _exchange(self, asked: Asked, method: str, path: str, headers: dict, data: bytes | None) -> BankOutcome:
        """One request and its answer, as an outcome whatever happens on the way."""
        session = self._open()
        try:
            async with session.request(
                method, self.base_url + path, headers=headers, data=data, allow_redirects=False
            ) as resp:
                raw = await _read_bounded(resp)
                replayed = resp.headers.get(REPLAYED_HEADER, "").lower() == "true"
                return (
                    BankOutcome("oversized", http_status=resp.status)
                    if raw is None
                    else _outcome(asked, resp.status, raw, replayed)
                )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            return BankOutcome("unreachable")  # no connection: the request was never sent
        except TimeoutError:
            return BankOutcome("timeout")
        except (aiohttp.ClientError, OSError) as exc:
            # The exception names the URL at most, never the body; log its type only.
            log.debug("bank connection problem", call=asked.call, error=type(exc).__name__)
            return BankOutcome("connection")
