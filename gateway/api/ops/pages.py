"""The console's handlers: thin, like gateway/api/routes.py, but answering HTML.

Reads go through reads.py, dead letters through the desk (port.py); a replay
goes through the desk as `gatewayctl dlq replay` does it, and recording a bank
reference through decisions.set_reference as `gatewayctl payments set-reference`.
The console's middleware (console_middleware) answers for every /ops request:
not configured, not logged in, cross-site POST, errors, and the security
headers of every response.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import Counter

from gateway import logs, webhooks
from gateway.api import routes
from gateway.api.ops import auth, reads, render, throttle
from gateway.api.ops.port import BrokerUnavailable, DeadLetterDesk
from gateway.api.ops.throttle import LoginThrottle
from gateway.ops import decisions

log = logs.get("gateway.ops")

STYLESHEET = (Path(__file__).parent / "static" / "console.css").read_bytes()
REALM = 'Basic realm="gateway ops", charset="UTF-8"'
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# The database is unreachable: as the API answers it (middleware._UNAVAILABLE), as a page.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)

# Actions named in form tokens and history causes.
REPLAY = "replay"
FORCED_REPLAY = "replay:force"
REPLAY_ALL = "replay-all"
SET_REFERENCE = "set-reference"
DISABLE_WEBHOOK = "webhook-disable"
RESEND_WEBHOOK = "webhook-resend"
RESEND_FAILED_WEBHOOKS = "webhook-resend-failed"
ALL = "*"
CONFIRMATION = "checked-the-bank"


@dataclass
class Console:
    """What the handlers need, wired once by ops.setup."""

    operators: dict[bytes, auth.Operator]  # empty: the console is not configured
    desk: DeadLetterDesk | None
    throttle: LoginThrottle
    login_failures: Counter  # by reason: bad_credentials, locked_out

    @property
    def names(self) -> set[str]:
        return {operator.name for operator in self.operators.values()}


CONSOLE = web.AppKey("ops_console", Console)
OPERATOR = web.RequestKey("ops_operator", auth.Operator)


def _pool(request: web.Request) -> asyncpg.Pool:
    return request.config_dict[routes.STATE].pool


def _desk(request: web.Request) -> DeadLetterDesk:
    desk = request.config_dict[CONSOLE].desk
    assert desk is not None, "a configured console has a desk"
    return desk


def _operator(request: web.Request) -> auth.Operator:
    return request[OPERATOR]


def _html(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    operator = request.get(OPERATOR)  # None on the pages that say who may log in
    body = render.page(template, operator=operator, path=request.path, **context)
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")


def _notice(request: web.Request, status: int, title: str, message: str, **extra: Any) -> web.Response:
    return _html(request, "notice.html", status, title=title, message=message, **extra)


# ---- the middleware ---------------------------------------------------------------------------


@web.middleware
async def console_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await _answer(request, handler)
    response.headers.update(SECURITY_HEADERS)
    return response


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    if request.path == "/ops":  # the sub-application's routes all start with /ops/
        return web.Response(status=308, headers={"Location": "/ops/"})
    console = request.app[CONSOLE]
    if not console.operators:
        return _notice(
            request,
            404,
            "The ops console is not configured",
            "Set GATEWAY_OPS_KEYS (comma-separated name:key pairs) on gateway-api to open /ops.",
        )
    operator = _login(request, console)
    if not isinstance(operator, auth.Operator):
        return operator
    request[OPERATOR] = operator
    with logs.bound(ops_user=operator.name):
        return await _handle(request, handler)


def _login(request: web.Request, console: Console) -> auth.Operator | web.Response:
    """The operator of the request's Basic credentials, or the answer: 401 (log in, or the
    login failed) or 429 with Retry-After (too many failures from this source or for this
    name: throttle.py)."""
    credentials = auth.basic_credentials(request.headers.get("Authorization", ""))
    if credentials is not None:
        source = throttle.source_of(request.remote)
        # Any name that is not an operator's is one name: the table holds no guessed strings.
        name = credentials[0] if credentials[0] in console.names else ""
        wait = console.throttle.wait(source, name)
        if wait > 0:
            console.login_failures.labels("locked_out").inc()
            return _locked_out(request, wait)
        operator = auth.authenticate(credentials, console.operators)
        if operator is not None:
            console.throttle.succeeded(source, name)
            return operator
        console.login_failures.labels("bad_credentials").inc()
        log.warning("ops login failed", source=source)
        wait = console.throttle.failed(source, name)
        if wait > 0:
            return _locked_out(request, wait)
    response = _notice(
        request,
        401,
        "Log in",
        "The ops console needs an ops key: your name in GATEWAY_OPS_KEYS as the user name, your key as the password.",
    )
    response.headers["WWW-Authenticate"] = REALM
    return response


def _locked_out(request: web.Request, wait: float) -> web.Response:
    response = _notice(request, 429, "Too many failed logins", "Too many failed logins: try again later.")
    response.headers["Retry-After"] = str(math.ceil(wait))
    return response


async def _handle(request: web.Request, handler) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        problem = auth.origin_problem(
            request.headers.get("Origin"), request.headers.get("Referer"), request.headers.get("Host")
        )
        if problem is not None:
            log.warning("ops request refused", reason=problem, method=request.method, path=request.path)
            return _notice(request, 403, "Refused", f"Refused: {problem}.")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _notice(request, exc.status, exc.reason, f"The request could not be handled: {exc.status} {exc.reason}.")
    except BrokerUnavailable as exc:
        log.warning("ops console: RabbitMQ unavailable", error=str(exc))
        return _notice(request, 503, "RabbitMQ is unavailable", f"The dead-letter queue cannot be read: {exc}")
    except _UNAVAILABLE as exc:
        log.warning("ops console: dependency unavailable", error=f"{type(exc).__name__}: {exc}")
        return _notice(request, 503, "PostgreSQL is unavailable", "The database cannot be reached; try again.")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("ops console: unhandled error", method=request.method, path=request.path)
        return _notice(request, 500, "Internal error", "The console failed to answer; the API log has the details.")


async def _form(request: web.Request, action: str, target: str) -> dict[str, str] | web.Response:
    """The posted form when its token allows this action on this target; else the refusal page."""
    form = await request.post()
    token = form.get("token")
    problem = auth.token_problem(_operator(request), action, target, token if isinstance(token, str) else "")
    if problem is not None:
        log.warning("ops request refused", reason=problem, action=action, target=target)
        return _notice(request, 403, "Refused", f"Refused: {problem}.")
    return {name: value for name, value in form.items() if isinstance(value, str)}


def _token(request: web.Request, action: str, target: str) -> str:
    return auth.form_token(_operator(request), action, target)


# ---- pages ------------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    data = await reads.overview(_pool(request), _desk(request))
    return _html(request, "overview.html", overview=data, stale_after=reads.CIRCUIT_STALE_AFTER)


async def flagged(request: web.Request) -> web.Response:
    rows = await reads.flagged(_pool(request))
    return _html(request, "flagged.html", payments=rows, limit=reads.LIST_LIMIT)


async def findings(request: web.Request) -> web.Response:
    rows = await reads.findings(_pool(request))
    return _html(request, "findings.html", findings=rows, limit=reads.LIST_LIMIT)


async def dead_letters(request: web.Request) -> web.Response:
    entries = await _desk(request).listing()
    tokens = {e.operation_id: _token(request, REPLAY, e.operation_id) for e in entries if e.operation_id}
    return _html(
        request, "dead_letters.html", entries=entries, tokens=tokens, replay_all=_token(request, REPLAY_ALL, ALL)
    )


async def dead_letter(request: web.Request) -> web.Response:
    operation_id = request.match_info["operation_id"]
    shown = await _desk(request).show(operation_id)
    if shown is None:
        return _notice(request, 404, "Unknown operation", f"No operation {operation_id} in the database or the queue.")
    return _html(request, "dead_letter.html", shown=shown, token=_token(request, REPLAY, operation_id))


async def confirm_force(request: web.Request) -> web.Response:
    """The explicit confirmation a replay past the key horizon needs (`gatewayctl dlq replay --force`)."""
    operation_id = request.match_info["operation_id"]
    shown = await _desk(request).show(operation_id)
    if shown is None:
        return _notice(request, 404, "Unknown operation", f"No operation {operation_id} in the database or the queue.")
    return _html(
        request,
        "confirm_force.html",
        shown=shown,
        token=_token(request, FORCED_REPLAY, operation_id),
        confirmation=CONFIRMATION,
    )


async def replay_one(request: web.Request) -> web.Response:
    operation_id = request.match_info["operation_id"]
    form = await _form(request, REPLAY, operation_id)
    if isinstance(form, web.Response):
        return form
    return await _replay(request, operation_id, False)


async def replay_forced(request: web.Request) -> web.Response:
    """`gatewayctl dlq replay --force`: only from the confirmation page, with its box ticked."""
    operation_id = request.match_info["operation_id"]
    form = await _form(request, FORCED_REPLAY, operation_id)
    if isinstance(form, web.Response):
        return form
    if form.get("confirm") != CONFIRMATION:
        return _notice(
            request,
            400,
            "Not confirmed",
            "A forced replay needs the confirmation that the bank was checked for a hold; nothing was sent.",
        )
    return await _replay(request, operation_id, True)


async def replay_all(request: web.Request) -> web.Response:
    """Every dead letter and parked operation, never forced (as `gatewayctl dlq replay --all`)."""
    form = await _form(request, REPLAY_ALL, ALL)
    if isinstance(form, web.Response):
        return form
    return await _replay(request, None, False)


async def _replay(request: web.Request, operation_id: str | None, forced: bool) -> web.Response:
    operator = _operator(request)
    results = await _desk(request).replay(operation_id, force=forced, actor=operator.name)
    for r in results:
        log.info(
            "ops replay",  # ops_user is bound by the middleware
            operation_id=r.operation_id,
            payment_id=r.payment_id,
            result=r.result,
            forced=r.forced,
        )
    return _html(request, "replay_result.html", results=results, operation_id=operation_id)


async def search(request: web.Request) -> web.Response:
    term = request.query.get("q", "").strip()
    rows = await reads.search(_pool(request), term) if term else []
    if len(rows) == 1:
        location = request.app.router["payment"].url_for(payment_id=rows[0]["id"])
        return web.Response(status=303, headers={"Location": str(location)})
    return _html(request, "search.html", term=term, payments=rows, limit=reads.SEARCH_LIMIT)


async def payment(request: web.Request) -> web.Response:
    payment_id = request.match_info["payment_id"]
    found = await reads.timeline(_pool(request), payment_id)
    if found is None:
        return _notice(request, 404, "Unknown payment", f"No payment {payment_id}.")
    token = _token(request, SET_REFERENCE, payment_id) if found.recordable else None
    return _html(request, "payment.html", timeline=found, reference_token=token)


async def set_reference(request: web.Request) -> web.Response:
    """Record a bank reference found at the bank (`gatewayctl payments set-reference`); back to the
    payment's page, which shows it and the history row naming the operator."""
    payment_id = request.match_info["payment_id"]
    form = await _form(request, SET_REFERENCE, payment_id)
    if isinstance(form, web.Response):
        return form
    name, value = form.get("name", ""), form.get("value", "").strip()
    try:
        await decisions.set_reference(
            _pool(request), payment_id, name, value, reason=form.get("reason", ""), by=_operator(request).name
        )
    except (decisions.OpsRefused, ValueError) as exc:
        status = 409 if isinstance(exc, decisions.OpsRefused) else 400
        return _notice(request, status, "Not recorded", f"Nothing was recorded: {exc}.")
    log.info("ops recorded a bank reference", payment_id=payment_id, reference=name)  # ops_user: the middleware's
    location = request.app.router["payment"].url_for(payment_id=payment_id)
    return web.Response(status=303, headers={"Location": str(location)})


async def webhook_endpoints(request: web.Request) -> web.Response:
    """`gatewayctl webhooks list` and `failed`, with the console's disable and resend."""
    pool = _pool(request)
    endpoints = await webhooks.endpoints(pool)
    failed = await webhooks.failed(pool, None, reads.LIST_LIMIT)
    return _html(
        request,
        "webhooks.html",
        endpoints=endpoints,
        failed=failed,
        limit=reads.LIST_LIMIT,
        disable_tokens={e["merchant"]: _token(request, DISABLE_WEBHOOK, e["merchant"]) for e in endpoints},
        resend_tokens={f["event_id"]: _token(request, RESEND_WEBHOOK, f["event_id"]) for f in failed},
        resend_all=_token(request, RESEND_FAILED_WEBHOOKS, ALL),
    )


async def disable_webhook(request: web.Request) -> web.Response:
    merchant = request.match_info["merchant"]
    form = await _form(request, DISABLE_WEBHOOK, merchant)
    if isinstance(form, web.Response):
        return form
    try:
        await webhooks.disable(_pool(request), merchant)
    except webhooks.NoEndpoint:
        return _notice(request, 404, "Unknown endpoint", f"{merchant} has no webhook endpoint.")
    log.info("ops disabled a webhook endpoint", merchant=merchant)
    return _back_to_webhooks(request)


async def resend_webhook(request: web.Request) -> web.Response:
    event_id = request.match_info["event_id"]
    form = await _form(request, RESEND_WEBHOOK, event_id)
    if isinstance(form, web.Response):
        return form
    if not await webhooks.resend(_pool(request), [event_id]):
        return _notice(request, 409, "Not resent", f"{event_id} is unknown, already pending, or has no endpoint.")
    log.info("ops resent a webhook delivery", event_id=event_id)
    return _back_to_webhooks(request)


async def resend_failed_webhooks(request: web.Request) -> web.Response:
    form = await _form(request, RESEND_FAILED_WEBHOOKS, ALL)
    if isinstance(form, web.Response):
        return form
    count = await webhooks.resend_failed(_pool(request))
    log.info("ops resent every failed webhook delivery", count=count)
    return _back_to_webhooks(request)


def _back_to_webhooks(request: web.Request) -> web.Response:
    return web.Response(status=303, headers={"Location": str(request.app.router["webhooks"].url_for())})


async def stylesheet(_request: web.Request) -> web.Response:
    return web.Response(body=STYLESHEET, content_type="text/css", charset="utf-8")


async def not_found(request: web.Request) -> web.Response:
    return _notice(request, 404, "Not found", "There is no such console page.")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", overview, name="overview")
    r.add_get("/flagged", flagged, name="flagged")
    r.add_get("/findings", findings, name="findings")
    r.add_get("/dead-letters", dead_letters, name="dead_letters")
    r.add_post("/dead-letters/replay-all", replay_all, name="replay_all")
    r.add_get("/dead-letters/{operation_id}", dead_letter, name="dead_letter")
    r.add_get("/dead-letters/{operation_id}/force", confirm_force, name="confirm_force")
    r.add_post("/dead-letters/{operation_id}/force", replay_forced, name="replay_forced")
    r.add_post("/dead-letters/{operation_id}/replay", replay_one, name="replay")
    r.add_get("/payments", search, name="search")
    r.add_get("/payments/{payment_id}", payment, name="payment")
    r.add_post("/payments/{payment_id}/reference", set_reference, name="set_reference")
    r.add_get("/webhooks", webhook_endpoints, name="webhooks")
    r.add_post("/webhooks/resend-failed", resend_failed_webhooks, name="resend_failed_webhooks")
    r.add_post("/webhooks/{merchant}/disable", disable_webhook, name="disable_webhook")
    r.add_post("/webhooks/events/{event_id}/resend", resend_webhook, name="resend_webhook")
    r.add_get("/console.css", stylesheet, name="stylesheet")
    r.add_route("*", "/{tail:.*}", not_found, name="not_found")
