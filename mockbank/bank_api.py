"""The contract's endpoints of the mock bank (docs/bank.md), and the chaos on their way.

Contract endpoints
------------------
POST /api/v1/authorizations | /captures | /voids | /refunds
GET  /api/v1/authorizations/{id} | /captures/{id} | /refunds/{id}
GET  /health -> 200 {"status": "healthy"}   (no latency, no failures)

Validation order of each operation: see ``mockbank.ledger``.

Processing of an API request (everything under /api/v1), in this order
--------------------------------------------------------------------
1. ``down`` switch on -> the connection is reset (TCP RST, no response);
   nothing is done.
2. POST only: ``Idempotency-Key`` missing, empty or longer than 255 chars ->
   400 with a PLAIN TEXT body.
3. POST only: the idempotency lookup. A remembered (key, path) -> the stored
   status and body, byte for byte, with ``X-Idempotent-Replayed: true``, at
   once. The new body is not even parsed. No latency, no failure, no response
   loss, no fault, no queueing. But the lookup FAILS (a database hiccup at the
   upstream bank) with probability KEY_LOOKUP_FAILURE_RATE, rolled for every
   POST, or for a "lookup_fails" fault, taken only by a request whose key IS
   remembered: the request then runs on as new from step 4 (a second hold, or
   ``authorization_already_used``/``already_refunded``), and the response
   remembered first stays the one replayed later.
4. POST only: the body is read (not parsed yet), so a client that goes away
   later cannot stop the work; one that leaves before sending it -> nothing.
5. An armed fault matching the request is taken (see /_mock/faults).
6. Sleep uniform(MIN_LATENCY_MS, MAX_LATENCY_MS) (+ the fault's delay_ms).
   No lock is held. If ``down`` was switched on meanwhile -> reset, nothing done.
7. Fault "drop" -> reset; fault "error" -> its status/body. Nothing done.
8. With probability FAILURE_RATE -> 500 {"error":"internal_error",...};
   nothing done (skipped for a "lose_response" or "forget_key" fault).
9. POST only: malformed JSON or a body that is not an object -> 400 PLAIN TEXT.
10. Only with DB_TRANSACTION_MS > 0 (``mockbank.contention``): wait for one of
    DB_POOL_SIZE connections, then (POST) for the row lock of the account the
    request touches (the card's; the authorization's or capture's account), and
    hold both for DB_TRANSACTION_MS. Requests on one card wait for each other
    and a busy card can exhaust the pool. ``down`` switched on meanwhile ->
    reset, nothing done. Off (0) by default: nothing queues.
11. The operation runs atomically (no await inside): the commit. The work
    stays done from here on, whatever happens to the client.
12. POST only: the remembered response is written (2xx only, 24 hours) as a
    separate step after the commit, tied to the client's connection as at the
    upstream bank. It is NOT written (stats ``keys_forgotten`` for a 2xx), so a
    repeat with the key runs again:
    - for a "forget_key" fault, always;
    - with probability KEY_FORGET_RATE when the client is gone at this point:
      it disconnected (killed, timed out, reset: stats ``clients_gone``; the
      mock, unlike a handler cancelled by its context, finishes the work even
      when the client left long before), or its response is about to be lost
      by RESPONSE_LOSS_RATE (step 13). Upstream forgets only when the client
      vanishes in the short window between the commit and the key write, so a
      rate of 1 is the worst case; with 0 (default) the key is always
      remembered, as before.
    A "lose_response" fault always remembers (its response is lost after the
    key was written). Errors are never remembered.
13. POST only: with probability RESPONSE_LOSS_RATE, or for a "lose_response"
    or "forget_key" fault, the connection is reset instead of answering (the
    work stays done). Applies to any executed operation's result (2xx or
    business 4xx), never to replays, injected 500s or 400 parse errors.
14. Every API response not ready RESPONSE_CUTOFF_SECONDS (15) after arrival is
    never written: the connection is closed without an answer when the
    handler is done (as the upstream bank "stops writing a response after
    15 s"; stats ``responses_cut_off``). Nothing is undone and a 2xx stays
    remembered: the client was still connected when the key was written.

GETs take steps 1, 5-8, 10 (a connection, no row lock), 11, 13 (for a
"lose_response" fault only) and 14.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from mockbank.idempotency import StoredResponse
from mockbank.ledger import Bank, Result
from mockbank.state import LOOKUP_FAULTS, REQUEST_FAULTS, STATE, WORK_FAULTS, Fault, State

log = logging.getLogger("mockbank")

MAX_KEY_LENGTH = 255
JSON = "application/json"


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer, as the contract's endpoints and the test endpoints give them."""
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON, headers=headers)


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


def _drop(request: web.Request, *, reset: bool = True) -> web.Response:
    """Close the connection without answering: a TCP reset, or with
    ``reset=False`` an orderly close (the client sees the server disconnect)."""
    transport = request.transport
    if transport is not None:
        if not reset:
            transport.close()
        else:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, AttributeError, ValueError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
    # aiohttp fails to write this to the closed transport and treats the
    # connection as gone; nothing reaches the client.
    return web.Response(status=503)


def _internal_error() -> web.Response:
    return json_response(500, {"error": "internal_error", "message": "injected failure (FAILURE_RATE)"})


def _fault_error(fault: Fault) -> web.Response:
    if isinstance(fault.body, str):
        return _text(fault.status, fault.body)
    body = fault.body if fault.body is not None else {"error": "internal_error", "message": "injected fault"}
    return json_response(fault.status, body)


def _chance(state: State, rate: float) -> bool:
    return rate > 0 and state.rng.random() < rate


def _client_gone(request: web.Request) -> bool:
    """The client closed or reset its connection (aiohttp lets the handler run on)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _dropped_down(request: web.Request, state: State) -> web.Response:
    state.stats["dropped_down"] += 1
    return _drop(request)


async def _chaos_prelude(
    request: web.Request, state: State, fault: Fault | None, *, skip_failure: bool = False
) -> web.Response | None:
    """Steps 6-8: latency, down re-check, fault action, failure roll."""
    chaos = state.chaos
    delay_ms = state.rng.uniform(chaos.min_latency_ms, chaos.max_latency_ms)
    if fault is not None:
        delay_ms += fault.delay_ms
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000.0)
    if state.chaos.down:
        return _dropped_down(request, state)
    if fault is not None:
        if fault.action == "drop":
            return _drop(request)
        if fault.action == "error":
            return _fault_error(fault)
    if not skip_failure and _chance(state, state.chaos.failure_rate):
        state.stats["injected_failures"] += 1
        return _internal_error()
    return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Operation = Callable[[Bank, dict[str, Any], str], Result]
LockedAccount = Callable[[Bank, dict[str, Any]], str | None]


def _api(handler: Handler) -> Handler:
    """Steps 1 and 14 around an API handler: arrival, and the response cut-off."""

    async def api_request(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        state = request.app[STATE]
        state.stats["api_requests"] += 1
        if state.chaos.down:
            return _dropped_down(request, state)
        response = await handler(request)
        if time.monotonic() - started > state.config.response_cutoff_seconds and not _client_gone(request):
            state.stats["responses_cut_off"] += 1
            return _drop(request, reset=False)
        return response

    return api_request


def _remembered(request: web.Request, state: State, key: str) -> StoredResponse | None:
    """Step 3: the idempotency lookup, which may fail and then finds nothing."""
    path = request.path
    stored = state.bank.idempotency.get(key, path)
    faulted = stored is not None and state.take_fault(request.method, path, LOOKUP_FAULTS) is not None
    if faulted or _chance(state, state.chaos.key_lookup_failure_rate):
        state.stats["lookup_failures"] += 1
        if stored is not None:
            log.info("key lookup failed: %s on %s runs again", key, path)
        return None
    return stored


def _key_forgotten(request: web.Request, state: State, fault: Fault | None, lost: bool) -> bool:
    """Step 12: does the bank fail to write the remembered response after the commit?"""
    if fault is not None and fault.action in WORK_FAULTS:
        return fault.action == "forget_key"
    gone = _client_gone(request)
    if gone:
        state.stats["clients_gone"] += 1
    return (gone or lost) and _chance(state, state.chaos.key_forget_rate)


def api_post(operation: Operation, locked_account: LockedAccount) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            state.stats["bad_requests"] += 1
            return _text(400, "missing Idempotency-Key header\n")
        if len(key) > MAX_KEY_LENGTH:
            state.stats["bad_requests"] += 1
            return _text(400, f"Idempotency-Key longer than {MAX_KEY_LENGTH} characters\n")

        path = request.path
        stored = _remembered(request, state, key)
        if stored is not None:
            state.stats["replays"] += 1
            return web.Response(
                status=stored.status, body=stored.body, content_type=JSON, headers={"X-Idempotent-Replayed": "true"}
            )

        try:
            raw = await request.read()
        except ConnectionError:
            return _drop(request)  # the client left before its body arrived: nothing to do

        fault = state.take_fault(request.method, path, REQUEST_FAULTS)
        work_fault = fault is not None and fault.action in WORK_FAULTS
        early = await _chaos_prelude(request, state, fault, skip_failure=work_fault)
        if early is not None:
            return early

        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            state.stats["bad_requests"] += 1
            return _text(400, "malformed JSON body\n")
        if not isinstance(payload, dict):
            state.stats["bad_requests"] += 1
            return _text(400, "request body must be a JSON object\n")

        async with state.database.transaction(locked_account(state.bank, payload)):
            if state.chaos.down:
                return _dropped_down(request, state)
            status, body = operation(state.bank, payload, key)  # the commit
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s %s", path, status, body.get("error") or _main_id(body))

        # The remembered response is written after the commit, as its own step.
        body_bytes = orjson.dumps(body)
        lost = work_fault or _chance(state, state.chaos.response_loss_rate)
        if not _key_forgotten(request, state, fault, lost):
            state.bank.idempotency.put(key, path, status, body_bytes)
        elif 200 <= status < 300:
            state.stats["keys_forgotten"] += 1
            log.info("key forgotten: %s on %s (%s done)", key, path, _main_id(body))

        if lost:
            state.stats["lost_responses"] += 1
            return _drop(request)
        return web.Response(status=status, body=body_bytes, content_type=JSON)

    return _api(handler)


def _main_id(body: dict[str, Any]) -> str:
    for k in ("refund_id", "void_id", "capture_id", "authorization_id"):
        if k in body:
            return str(body[k])
    return ""


def api_get(lookup: Callable[[Bank, str], Result]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        fault = state.take_fault(request.method, request.path, REQUEST_FAULTS)
        lose = fault is not None and fault.action == "lose_response"
        early = await _chaos_prelude(request, state, fault, skip_failure=lose)
        if early is not None:
            return early
        async with state.database.transaction(None):
            if state.chaos.down:
                return _dropped_down(request, state)
            status, body = lookup(state.bank, request.match_info["id"])
        if lose:
            state.stats["lost_responses"] += 1
            return _drop(request)
        return json_response(status, body)

    return _api(handler)


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.chaos.down:
        return _dropped_down(request, state)
    return json_response(200, {"status": "healthy"})


def add_routes(router: web.UrlDispatcher) -> None:
    """The contract's endpoints (docs/bank.md) on `router`."""
    router.add_post("/api/v1/authorizations", api_post(Bank.authorize, Bank.card_account))
    router.add_post("/api/v1/captures", api_post(Bank.capture, Bank.authorization_account))
    router.add_post("/api/v1/voids", api_post(Bank.void, Bank.authorization_account))
    router.add_post("/api/v1/refunds", api_post(Bank.refund, Bank.capture_account))
    router.add_get("/api/v1/authorizations/{id}", api_get(Bank.get_authorization), allow_head=False)
    router.add_get("/api/v1/captures/{id}", api_get(Bank.get_capture), allow_head=False)
    router.add_get("/api/v1/refunds/{id}", api_get(Bank.get_refund), allow_head=False)
    router.add_get("/health", health, allow_head=False)
