"""Thin handlers: read the request, call payments / views, answer.

Every write goes through one atomic phase of gateway/payments/intake.py; every
read through gateway/views.py. Nothing here touches SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from gateway import feed, logs, store, views
from gateway.api import docs, schemas
from gateway.api.admission import Refused
from gateway.api.errors import JSON, ApiError
from gateway.api.health import Readiness
from gateway.api.longpoll import PaymentWatcher
from gateway.api.middleware import ADMISSION, CALLER, ENDS_WITH_CLIENT
from gateway.batching import Batcher
from gateway.cards import CardVault
from gateway.domain import REFERENCE_UNKNOWN, Action, InvalidTransition, ReferenceUnknown
from gateway.fingerprints import Fingerprinter
from gateway.payments import intake

SUBMIT_BATCH = 512


@dataclass
class State:
    """What the handlers need, wired once by app.create_app."""

    vault: CardVault
    fingerprinter: Fingerprinter
    watcher: PaymentWatcher
    registry: CollectorRegistry
    openapi: bytes
    # Opened by the app's cleanup context once the event loop runs.
    _pool: asyncpg.Pool | None = None
    _readiness: Readiness | None = None
    # Concurrent authorize requests recorded together (one statement, one commit), and
    # concurrent captures, voids and refunds (two statements, one commit).
    _submits: Batcher[store.Submission, asyncpg.Record] | None = None
    _actions: Batcher[intake.ActionRequest, intake.ActionOutcome] | None = None

    def connect(self, pool: asyncpg.Pool, readiness: Readiness) -> None:
        self._pool, self._readiness = pool, readiness
        # Up to SUBMIT_BATCH authorizations a commit: under load the batches grow rather than queue.
        self._submits = Batcher(lambda submissions: intake.submit_many(pool, submissions), max_size=SUBMIT_BATCH)
        self._actions = Batcher(lambda asked: intake.request_actions(pool, asked))

    @property
    def submits(self) -> Batcher[store.Submission, asyncpg.Record]:
        if self._submits is None:
            raise RuntimeError("the app has not started: no database pool yet")
        return self._submits

    @property
    def actions(self) -> Batcher[intake.ActionRequest, intake.ActionOutcome]:
        if self._actions is None:
            raise RuntimeError("the app has not started: no database pool yet")
        return self._actions

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the app has not started: no database pool yet")
        return self._pool

    @property
    def readiness(self) -> Readiness:
        if self._readiness is None:
            raise RuntimeError("the app has not started: no readiness probe yet")
        return self._readiness


STATE = web.AppKey("state", State)

M = TypeVar("M", bound=BaseModel)

BODY_READ_SECONDS = 10.0


# ---- request helpers ----------------------------------------------------------------


def _json(status: int, body: bytes | dict, headers: dict[str, str] | None = None) -> web.Response:
    if not isinstance(body, bytes):
        body = orjson.dumps(body)
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        raise ApiError(400, "idempotency_key_missing", "POST requests need an Idempotency-Key header")
    if not schemas.IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "idempotency_key_invalid", "Idempotency-Key must be 1-255 printable ASCII characters")
    return key


def _idempotent(request: web.Request, key: str, body: bytes) -> intake.IdempotentRequest:
    fingerprints = request.app[STATE].fingerprinter.of("POST", request.path, body)
    return intake.IdempotentRequest(request[CALLER], key, "POST", request.path, fingerprints)


def _payment_id(request: web.Request) -> str:
    payment_id = request.match_info["payment_id"]
    if not schemas.PAYMENT_ID.fullmatch(payment_id):
        raise ApiError(404, "payment_not_found", "no such payment")
    logs.bind(payment_id=payment_id)
    return payment_id


async def _body(request: web.Request) -> bytes:
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):
            body = await request.read()
    except TimeoutError:
        # A client that stalls mid-body would otherwise hold a connection and a handler forever.
        raise ApiError(
            408, "request_timeout", f"the body did not arrive within {BODY_READ_SECONDS:g} s", close_connection=True
        ) from None
    if body and "Content-Type" in request.headers:  # an empty body may come with any (or no) type
        if request.content_type != JSON:
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    return body


# Far deeper than any request of ours (3 levels). Every JSON parser recurses per level, and
# 1,500 levels of `{"a":` made the duplicate-key check a RecursionError (a 500).
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = frozenset(b"[{")


def _too_deep(body: bytes) -> bool:
    """Do the body's arrays and objects nest deeper than MAX_JSON_DEPTH (brackets in strings
    aside)? Read before any parser sees the body."""
    if body.count(b"{") + body.count(b"[") <= MAX_JSON_DEPTH:
        return False  # every request of ours: not enough brackets to nest that deep
    depth = 0
    for bracket in _JSON_STRING.sub(b"", body).translate(None, _NOT_A_BRACKET):
        depth += 1 if bracket in _OPENING else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def _parse(model: type[M], body: bytes) -> M:
    if _too_deep(body):
        raise ApiError(400, "invalid_json", f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    duplicates = _duplicate_keys(body)
    if duplicates:
        raise _invalid("the request body names a field twice", [_twice("body", name) for name in duplicates])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if schemas.is_invalid_json(exc):
            raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
        raise _invalid("the request body is invalid", schemas.error_details(exc, "body")) from None


def _duplicate_keys(body: bytes) -> list[str]:
    """Field names an object of the body repeats: JSON parsers keep the last one silently,
    so `{"amount": 1, "amount": 100}` would mean whatever the last parser in line thinks."""
    seen: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.extend(sorted(name for name, n in Counter(name for name, _ in items).items() if n > 1))
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except ValueError:
        return []  # not JSON: the model's own parse says so
    return seen


def _twice(location: str, name: str) -> dict:
    return {"field": f"{location}.{schemas.clean_field(name)}", "code": "duplicate", "message": "given more than once"}


def _query(model: type[M], request: web.Request) -> M:
    duplicates = sorted(name for name, n in Counter(name for name, _ in request.query.items()).items() if n > 1)
    if duplicates:
        raise _invalid("the query string names a parameter twice", [_twice("query", n) for n in duplicates])
    try:
        return model.model_validate(dict(request.query.items()))
    except ValidationError as exc:
        raise _invalid("the query string is invalid", schemas.error_details(exc, "query")) from None


def _invalid(message: str, details: list[dict]) -> ApiError:
    return ApiError(422, "validation_error", message, details=details)


def _respond(response: intake.Response) -> web.Response:
    headers = {}
    if response.location:
        headers["Location"] = response.location
    if response.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _json(response.status, response.body, headers)


def _key_errors(exc: Exception) -> ApiError:
    if isinstance(exc, intake.RequestInProgress):
        return ApiError(
            409,
            "request_in_progress",
            "a request with this Idempotency-Key is still being handled; retry shortly",
            headers={"Retry-After": "1"},
        )
    return ApiError(
        422, "idempotency_key_reused", "this Idempotency-Key was used for a different request (other body or path)"
    )


# ---- /v1/payments -----------------------------------------------------------------------


async def authorize(request: web.Request) -> web.Response:
    key = _idempotency_key(request)
    body = await _body(request)
    state = request.app[STATE]
    req = _idempotent(request, key, body)
    try:
        data = _parse(schemas.AuthorizeIn, body)
    except ApiError as exc:
        # A retry of a request accepted before its card's expiry month ended gets its stored answer.
        if exc.status == 422 and all(d["code"] == "card_expired" for d in exc.extra["details"]):
            stored = await _stored(state, req)
            if stored is not None:
                return _respond(stored)
        raise
    card = data.card
    submission = intake.authorization(
        state.vault,
        req,
        order_id=data.order_id,
        customer_id=data.customer_id,
        amount=data.amount,
        card=intake.CardInput(card.number, card.cvv, card.expiry_month, card.expiry_year),
    )
    try:
        response = await intake.answer_authorization(state.pool, req, submission, state.submits.submit(submission))
    except (intake.RequestInProgress, intake.IdempotencyKeyReused) as exc:
        raise _key_errors(exc) from None
    except intake.OrderAlreadyPaid as exc:
        raise ApiError(
            409,
            "order_already_paid",
            f"order {data.order_id} already has a live payment {exc.payment_id}",
            payment_id=exc.payment_id,
        ) from None
    if response.location:
        payment_id = response.location.rsplit("/", 1)[-1]
        logs.bind(payment_id=payment_id)
        if not response.replayed:
            state.watcher.accepted(payment_id, request[CALLER])
    return _respond(response)


async def _stored(state: State, req: intake.IdempotentRequest) -> intake.Response | None:
    try:
        return await intake.stored_response(state.pool, req)
    except (intake.RequestInProgress, intake.IdempotencyKeyReused):
        return None


def action(kind: Action):
    async def handler(request: web.Request) -> web.Response:
        key = _idempotency_key(request)
        payment_id = _payment_id(request)
        body = await _body(request)
        amount = _parse(schemas.ActionIn, body).amount if body.strip() else None
        state = request.app[STATE]
        req = _idempotent(request, key, body)
        try:
            outcome = await state.actions.submit(intake.action_request(req, payment_id, kind, amount))
            response = await intake.answer_action(state.pool, req, outcome)
        except (intake.RequestInProgress, intake.IdempotencyKeyReused) as exc:
            raise _key_errors(exc) from None
        except intake.PaymentNotFound:
            raise ApiError(404, "payment_not_found", "no such payment") from None
        except intake.AmountMismatch as exc:
            raise ApiError(
                422,
                "amount_mismatch",
                f"amount must equal the payment's full amount {exc.expected}; partial {kind.value}s are not supported",
                expected_amount=exc.expected,
            ) from None
        except InvalidTransition as exc:
            raise ApiError(
                409,
                "invalid_state_transition",
                f"cannot {kind.value} a payment that is {exc.status.value}",
                status=exc.status.value,
            ) from None
        except ReferenceUnknown as exc:
            raise ApiError(409, REFERENCE_UNKNOWN, str(exc), status=exc.status.value, reference=exc.reference) from None
        return _respond(response)

    handler.__name__ = f"{kind.value}_payment"
    return handler


async def get_payment(request: web.Request) -> web.Response:
    query = _query(schemas.GetQuery, request)
    payment_id = _payment_id(request)
    state, merchant = request.app[STATE], request[CALLER]

    def read():
        return views.get_payment(state.pool, merchant, payment_id)

    if query.wait > 0:
        admission = request.app[ADMISSION]
        no_room = admission.wait_refusal(merchant)
        if no_room is not None:
            raise Refused(no_room)
        payment = await state.watcher.wait_settled(
            payment_id, merchant, read, query.wait, parked=lambda: _parked(request, merchant)
        )
    else:
        payment = await read()
    if payment is None:
        raise ApiError(404, "payment_not_found", "no such payment")
    return _json(200, payment)


@contextlib.contextmanager
def _parked(request: web.Request, merchant: str) -> Iterator[None]:
    """A long poll waiting: not work in flight (admission), and ended when its client goes."""
    with request.app[ADMISSION].parked(merchant):
        request[ENDS_WITH_CLIENT] = True
        try:
            yield
        finally:
            request[ENDS_WITH_CLIENT] = False


async def list_payments(request: web.Request) -> web.Response:
    query = _query(schemas.ListQuery, request)
    page = await views.list_payments(
        request.app[STATE].pool,
        request[CALLER],
        order_id=query.order_id,
        customer_id=query.customer_id,
        limit=query.limit,
        starting_after=query.starting_after,
    )
    if page is None:
        raise ApiError(404, "payment_not_found", "starting_after names no payment", param="starting_after")
    data, has_more = page
    return _json(200, {"data": data, "has_more": has_more})


# ---- /v1/events --------------------------------------------------------------------------


async def list_events(request: web.Request) -> web.Response:
    query = _query(schemas.EventsQuery, request)
    pool, merchant = request.app[STATE].pool, request[CALLER]
    try:
        if query.wait > 0:
            no_room = request.app[ADMISSION].wait_refusal(merchant)
            if no_room is not None:
                raise Refused(no_room)
            with _parked(request, merchant):
                page = await feed.wait(pool, merchant, after=query.after, limit=query.limit, seconds=query.wait)
        else:
            page = await feed.read(pool, merchant, after=query.after, limit=query.limit)
    except feed.UnknownCursor:
        raise ApiError(
            404, "event_not_found", "after names no event (or one older than 30 days)", param="after"
        ) from None
    return _json(200, page.json())


# ---- operations -------------------------------------------------------------------------


async def openapi_json(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].openapi)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/payments", authorize, name="authorize")
    r.add_get("/v1/payments", list_payments, name="list_payments")
    r.add_get("/v1/payments/{payment_id}", get_payment, name="get_payment")
    r.add_get("/v1/events", list_events, name="list_events")
    for kind in Action:
        r.add_post(f"/v1/payments/{{payment_id}}/{kind.value}", action(kind), name=f"{kind.value}_payment")
    r.add_get("/openapi.json", openapi_json, name="openapi")
    docs.setup(app)
