"""What every request goes through: request id, trace, API key, error format, access log, metrics.

One middleware rather than a stack of them: each layer of an aiohttp
middleware chain costs a coroutine frame per request, and these concerns
share the same try/finally anyway.

The trace: a request's W3C `traceparent` is continued (or a trace started), so the
commands and events it writes and its log lines (the access line included) carry it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import re
import time

import asyncpg
import structlog
from aiohttp import web
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway import db, logs, tracing
from gateway.api.admission import Admission, Refusal, Refused
from gateway.api.errors import ApiError, error_response, from_http_exception

log = logs.get("gateway.api")

MERCHANT = web.AppKey("merchant_by_key_digest", dict)
# The caller's name (scope of payments and idempotency keys), set once the API key checks out.
CALLER = web.RequestKey("caller", str) if hasattr(web, "RequestKey") else "caller"
# Set while the request only waits (a long poll parked): its client going away ends it (server.py).
ENDS_WITH_CLIENT = web.RequestKey("ends_with_client", bool) if hasattr(web, "RequestKey") else "ends_with_client"

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CONTEXT = ("request_id", "payment_id", "merchant")

# The database or the network is down: the client may retry the same request (same key) later.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # a restart or pg_terminate_backend cut the connection
    asyncpg.InterfaceError,  # the connection was closed under the request
    asyncpg.TooManyConnectionsError,
    # asyncpg's own state machine refusing a pooled connection whose server sent a fatal error
    # and went away before the pool noticed ("cannot switch to state 12; another operation (2)
    # is in progress"): seen when a database primary dies under load. The next request gets
    # a fresh connection; the same request (same key) again is safe.
    asyncpg.InternalClientError,
    # a pooled connection to a primary being switched over, read-only until it is stopped
    # ("cannot execute ... in a read-only transaction"): nothing was written
    asyncpg.ReadOnlySQLTransactionError,
)

BEARER = 'Bearer realm="gateway"'
REFUSAL_LOG_SECONDS = 1.0


def new_request_id() -> str:
    """Unique, not secret: the process's Mersenne Twister, not the kernel's random source (a
    system call per request; uuid4 spent 4% of the API's CPU in overload)."""
    return f"req_{random.getrandbits(128):032x}"


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def merchants_by_digest(api_keys: dict[str, str]) -> dict[bytes, str]:
    """Keys are looked up by their sha256, so lookups take the same time whatever the guess."""
    return {key_digest(key): name for key, name in api_keys.items()}


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry):
        labels = ("method", "route", "status")
        self.requests = Counter("gateway_http_requests", "HTTP requests handled", labels, registry=registry)
        self.latency = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer an HTTP request",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
            registry=registry,
        )
        self.refused = Counter(
            "gateway_http_requests_refused",
            "Requests refused at once because the API is at capacity (503) or a caller over its share (429)",
            ("reason",),
            registry=registry,
        )
        self._children: dict[tuple[str, str, str], tuple] = {}
        self._refused_by_reason: dict[str, Counter] = {}

    def count_refused(self, reason: str) -> None:
        # The labelled child kept: labels() costs more than the rest of counting a refusal.
        child = self._refused_by_reason.get(reason)
        if child is None:
            child = self._refused_by_reason[reason] = self.refused.labels(reason)
        child.inc()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)


METRICS = web.AppKey("http_metrics", HttpMetrics)
ADMISSION = web.AppKey("admission", Admission)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _authenticate(request: web.Request, app: web.Application) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthorized", "send Authorization: Bearer <api key>", headers={"WWW-Authenticate": BEARER}
        )
    merchant = app[MERCHANT].get(key_digest(token.strip()))
    if merchant is None:
        raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": BEARER})
    return merchant


class RefusalLog:
    """Requests refused for load are logged as one line a second with counts by reason, not a
    line each: in overload they come by the thousand a second, and a line each would spend the
    CPU the API is short of on telling what the refused counter already says."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._due: asyncio.TimerHandle | None = None

    def add(self, reason: str) -> None:
        if self._due is None:
            self._due = asyncio.get_running_loop().call_later(REFUSAL_LOG_SECONDS, self.flush)
        self.counts[reason] += 1

    def flush(self) -> None:
        """Log what was counted, now (also at shutdown)."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        if self.counts:
            log.warning("requests refused for load", seconds=REFUSAL_LOG_SECONDS, **self.counts)
            self.counts.clear()


REFUSALS = web.AppKey("refusal_log", RefusalLog)


def refused(app: web.Application, refusal: Refusal) -> web.Response:
    """The answer to a request refused for load (nothing was done: the same request may be sent
    again, with the same Idempotency-Key), counted by reason."""
    app[METRICS].count_refused(refusal.reason)
    app[REFUSALS].add(refusal.reason)
    return error_response(
        refusal.status, refusal.code, refusal.message, headers={"Retry-After": str(refusal.retry_after)}
    )


@web.middleware
async def api_middleware(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    app = request.app  # a property that asks the route each time
    request_id = request.headers.get("X-Request-Id")
    if request_id is None or not _REQUEST_ID.match(request_id):
        request_id = new_request_id()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    method = request.method if request.method in _METHODS else "OTHER"
    route = _route(request)
    status = 499  # the client went away before an answer was ready
    shed = False  # refused for load: counted, and logged in RefusalLog's summary
    with tracing.started(request.headers, f"{method} {route}", tracing.SpanKind.SERVER) as span:
        try:
            try:
                path = request.path
                if path.startswith("/v1/") or path == "/v1":
                    merchant = request[CALLER] = _authenticate(request, app)
                    structlog.contextvars.bind_contextvars(merchant=merchant)
                    admission = app[ADMISSION]
                    refusal = admission.admit(merchant, adds_work=request.method == "POST")
                    if refusal is None:
                        try:
                            response = await handler(request)
                        finally:
                            admission.release(merchant)
                    else:
                        shed = True
                        response = refused(app, refusal)
                else:
                    response = await handler(request)
            except Refused as exc:  # by a handler: a long poll past its share
                shed = True
                response = refused(app, exc.refusal)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                response = from_http_exception(exc)
            except _UNAVAILABLE as exc:
                log.warning("dependency unavailable", error=f"{type(exc).__name__}: {exc}")
                response = error_response(
                    503,
                    "service_unavailable",
                    "a dependency of the gateway is unavailable; retry later",
                    headers={"Retry-After": "1"},
                )
            except db.TIMED_OUT as exc:  # the request's transaction was rolled back: nothing done
                log.warning("database timed out", error=type(exc).__name__)
                response = error_response(
                    503,
                    "service_unavailable",
                    "the payment is busy or the database is slow: nothing was done; retry shortly with the same "
                    "Idempotency-Key",
                    headers={"Retry-After": "1"},
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unhandled error", method=request.method, route=route)
                response = error_response(500, "internal_error", "the gateway failed to handle the request")
            response.headers["X-Request-Id"] = request_id
            response.headers[tracing.TRACERESPONSE] = tracing.traceresponse(span)
            status = response.status
            return response
        finally:
            seconds = time.perf_counter() - started
            app[METRICS].observe(method, route, status, seconds)
            if not shed:
                log.info("request", method=method, route=route, status=status, duration_ms=round(seconds * 1000, 2))
            structlog.contextvars.unbind_contextvars(*_CONTEXT)
            if span.is_recording():
                span.set_attributes(
                    {"http.request.method": method, "http.route": route, "http.response.status_code": status}
                )
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
