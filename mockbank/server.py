"""The mock card bank: an aiohttp server honouring docs/bank.md (the bank contract).

Run ``mockbank [--host 127.0.0.1] [--port 8787]``. State lives in memory and is
lost at exit. Environment variables are described in ``mockbank.config``
(MIN_LATENCY_MS, MAX_LATENCY_MS, FAILURE_RATE, RESPONSE_LOSS_RATE,
KEY_FORGET_RATE, KEY_LOOKUP_FAILURE_RATE, RESPONSE_CUTOFF_SECONDS,
DB_TRANSACTION_MS, DB_POOL_SIZE, AUTH_EXPIRY_HOURS, MOCKBANK_EXTRA_ACCOUNTS,
LOG_LEVEL); a bad value makes the process print a message naming the variable
and exit with code 2.

SIGTERM/SIGINT: stop accepting, give in-flight requests 0.5 s, exit 0.
uvloop is used when importable.

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

Test/ops endpoints (never subject to chaos, always JSON)
-------------------------------------------------------
GET  /_mock/ledger[?accounts=all|touched]
     200 {"now": ts,
          "accounts": [{"account_id", "kind": "test"|"extra", "card_last4",
                        "brand", "expiry_month", "expiry_year",
                        "balance", "available", "held"}],
          "authorizations": [{"authorization_id", "account_id", "card_last4",
                        "amount", "currency", "status": "open"|"captured"|"voided",
                        "expired": bool, "created_at", "expires_at",
                        "idempotency_key", "capture_id", "void_id"}],
          "captures": [{"capture_id", "authorization_id", "account_id", "amount",
                        "currency", "captured_at", "idempotency_key", "refund_id"}],
          "voids":    [{"void_id", "authorization_id", "account_id", "amount",
                        "voided_at", "idempotency_key"}],
          "refunds":  [{"refund_id", "capture_id", "authorization_id", "account_id",
                        "amount", "currency", "refunded_at", "idempotency_key"}],
          "idempotency_entries": int,
          "chaos": {...as GET /_mock/chaos...},
          "stats": {"api_requests", "replays", "injected_failures",
                    "lost_responses", "dropped_down", "faults_applied",
                    "bad_requests", "clients_gone", "keys_forgotten",
                    "lookup_failures", "responses_cut_off"}}
     Lists are in creation order. Amounts in cents. Card numbers appear as
     last4 only. accounts=touched lists the four test accounts plus the extra
     accounts that have at least one authorization.
GET  /_mock/accounts[?offset=N&limit=M]
     200 {"total": int, "accounts": [ledger account fields + "card_number", "cvv"]}
     (full test card data, for load generators; the four test cards first,
     then generated ones, see ``mockbank.ledger.extra_card``)
GET  /_mock/chaos -> 200 {"min_latency_ms", "max_latency_ms", "failure_rate",
                          "response_loss_rate", "key_forget_rate",
                          "key_lookup_failure_rate", "down"}
PUT  /_mock/chaos (PATCH too) with any subset of those fields -> 200 new state,
     or 400 {"error": "invalid_chaos", "message"}. ``down: true`` makes every
     /api/v1 request and GET /health get a connection reset, and resets the
     connections of requests still sleeping in step 6 or queued in step 10.
POST /_mock/authorizations/{id}/expire -> 200 {ledger authorization entry}
     (expires_at moved 1 s into the past) or 404 {"error": "not_found"}
POST /_mock/idempotency/expire -> 200 {"forgotten": n}: forget all remembered
     responses, as if 24 hours had passed.
POST /_mock/reset -> 200 {"status": "reset"}: initial balances, empty books,
     nothing remembered, chaos back to the start-up values, faults and stats
     cleared.
POST /_mock/faults -> 201 {fault}: arm a deterministic fault. Body:
     {"action": "error"|"drop"|"lose_response"|"forget_key"|"lookup_fails"|"delay",
      "path": "/api/v1/captures" (exact; a trailing "*" makes it a prefix),
      "method": "POST"|"GET" (optional: any), "times": 1 (>= 1),
      "delay_ms": 0 (extra latency, any action),
      "status": 500, "body": {...} or "plain text" (action "error" only;
      default body {"error": "internal_error", "message": "injected fault"})}
     Each matching non-replay API request consumes one use (first armed
     first). Use it e.g. to get ``already_captured`` or a 15 s stall.
     "forget_key" (POST only): do the work, reset the connection and do NOT
     remember the key (step 12), so a repeat runs again. "lookup_fails" (POST
     only): consumed only by a request whose key IS remembered (step 3), which
     then runs as new. "lose_response": do the work, remember a 2xx, reset.
GET  /_mock/faults -> 200 {"faults": [{fault, "remaining": n}]}
DELETE /_mock/faults -> 200 {"cleared": n}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import random
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway import process
from gateway.config import epilog
from mockbank.config import Chaos, Config, ConfigError, validate_chaos_update
from mockbank.contention import Database
from mockbank.idempotency import StoredResponse
from mockbank.ledger import Bank, Result

log = logging.getLogger("mockbank")

MAX_KEY_LENGTH = 255
SWEEP_INTERVAL_S = 60.0
JSON = "application/json"

# Fault actions by the step that takes them (see the module docstring).
LOOKUP_FAULTS = frozenset({"lookup_fails"})
REQUEST_FAULTS = frozenset({"error", "drop", "lose_response", "forget_key", "delay"})
POST_ONLY_FAULTS = frozenset({"lookup_fails", "forget_key"})
# Faults that promise the work is done, so the FAILURE_RATE roll is skipped.
WORK_FAULTS = frozenset({"lose_response", "forget_key"})


# ------------------------------------------------------------------ state
@dataclass
class Fault:
    fault_id: str
    action: str
    path: str
    method: str | None
    remaining: int
    delay_ms: float = 0.0
    status: int = 500
    body: Any = None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path

    def public(self) -> dict[str, Any]:
        return {
            "fault_id": self.fault_id,
            "action": self.action,
            "path": self.path,
            "method": self.method,
            "remaining": self.remaining,
            "delay_ms": self.delay_ms,
            "status": self.status,
            "body": self.body,
        }


def _new_stats() -> dict[str, int]:
    return dict.fromkeys(
        (
            "api_requests",
            "replays",
            "injected_failures",
            "lost_responses",
            "dropped_down",
            "faults_applied",
            "bad_requests",
            "clients_gone",
            "keys_forgotten",
            "lookup_failures",
            "responses_cut_off",
        ),
        0,
    )


@dataclass
class State:
    config: Config
    bank: Bank
    chaos: Chaos
    database: Database
    rng: random.Random = field(default_factory=random.Random)
    faults: list[Fault] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=_new_stats)
    fault_ids: Any = field(default_factory=lambda: itertools.count(1))

    def take_fault(self, method: str, path: str, actions: frozenset[str]) -> Fault | None:
        for fault in self.faults:
            if fault.action in actions and fault.matches(method, path):
                fault.remaining -= 1
                self.stats["faults_applied"] += 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                return fault
        return None


STATE = web.AppKey("state", State)


# ---------------------------------------------------------------- responses
def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
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
    return _json(500, {"error": "internal_error", "message": "injected failure (FAILURE_RATE)"})


def _fault_error(fault: Fault) -> web.Response:
    if isinstance(fault.body, str):
        return _text(fault.status, fault.body)
    body = fault.body if fault.body is not None else {"error": "internal_error", "message": "injected fault"}
    return _json(fault.status, body)


# ------------------------------------------------------------- API pipeline
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
        return _json(status, body)

    return _api(handler)


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.chaos.down:
        return _dropped_down(request, state)
    return _json(200, {"status": "healthy"})


# --------------------------------------------------------------- /_mock/*
async def mock_ledger(request: web.Request) -> web.Response:
    state = request.app[STATE]
    accounts = request.query.get("accounts", "all")
    if accounts not in ("all", "touched"):
        return _json(400, {"error": "invalid_request", "message": "accounts must be all or touched"})
    snapshot = state.bank.ledger(accounts)
    snapshot["chaos"] = state.chaos.as_dict()
    snapshot["stats"] = dict(state.stats)
    return _json(200, snapshot)


async def mock_accounts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query["limit"]) if "limit" in request.query else None
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError
    except ValueError:
        return _json(400, {"error": "invalid_request", "message": "offset/limit must be integers >= 0"})
    return _json(200, {"total": len(state.bank.accounts), "accounts": state.bank.account_listing(offset, limit)})


async def mock_chaos_get(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].chaos.as_dict())


async def mock_chaos_put(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        update = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json(400, {"error": "invalid_chaos", "message": "malformed JSON"})
    if not isinstance(update, dict):
        return _json(400, {"error": "invalid_chaos", "message": "body must be a JSON object"})
    try:
        state.chaos = validate_chaos_update(state.chaos, update)
    except ConfigError as exc:
        return _json(400, {"error": "invalid_chaos", "message": str(exc)})
    log.info("chaos changed: %s", state.chaos.as_dict())
    return _json(200, state.chaos.as_dict())


async def mock_expire(request: web.Request) -> web.Response:
    entry = request.app[STATE].bank.expire_authorization(request.match_info["id"])
    if entry is None:
        return _json(404, {"error": "not_found", "message": "authorization not found"})
    return _json(200, entry)


async def mock_idempotency_expire(request: web.Request) -> web.Response:
    return _json(200, {"forgotten": request.app[STATE].bank.idempotency.forget_all()})


async def mock_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.bank.reset()
    state.chaos = Chaos(**state.config.chaos.as_dict())
    state.faults.clear()
    state.stats = _new_stats()
    return _json(200, {"status": "reset"})


async def mock_faults_add(request: web.Request) -> web.Response:
    state = request.app[STATE]

    def bad(msg: str) -> web.Response:
        return _json(400, {"error": "invalid_fault", "message": msg})

    try:
        spec = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return bad("malformed JSON")
    if not isinstance(spec, dict):
        return bad("body must be a JSON object")
    unknown = set(spec) - {"action", "path", "method", "times", "delay_ms", "status", "body"}
    if unknown:
        return bad(f"unknown field(s): {', '.join(sorted(unknown))}")
    action = spec.get("action")
    if action not in LOOKUP_FAULTS | REQUEST_FAULTS:
        return bad("action must be error, drop, lose_response, forget_key, lookup_fails or delay")
    path = spec.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return bad("path must be a string starting with /")
    method = spec.get("method")
    if method is not None and method not in ("GET", "POST"):
        return bad("method must be GET or POST")
    if action in POST_ONLY_FAULTS:
        if method == "GET":
            return bad(f"{action} applies to POSTs only (a GET has no idempotency key)")
        method = "POST"
    times = spec.get("times", 1)
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        return bad("times must be an integer >= 1")
    delay = spec.get("delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        return bad("delay_ms must be a number >= 0")
    status = spec.get("status", 500)
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        return bad("status must be an HTTP status code")
    body = spec.get("body")
    if body is not None and not isinstance(body, (dict, str)):
        return bad("body must be an object or a string")
    fault = Fault(f"flt_{next(state.fault_ids)}", action, path, method, times, float(delay), status, body)
    state.faults.append(fault)
    return _json(201, fault.public())


async def mock_faults_list(request: web.Request) -> web.Response:
    return _json(200, {"faults": [f.public() for f in request.app[STATE].faults]})


async def mock_faults_clear(request: web.Request) -> web.Response:
    faults = request.app[STATE].faults
    n = len(faults)
    faults.clear()
    return _json(200, {"cleared": n})


# ------------------------------------------------------------------- app
async def _sweeper(app: web.Application):
    async def loop() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            app[STATE].bank.idempotency.sweep()

    task = asyncio.get_running_loop().create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_app(config: Config) -> web.Application:
    app = web.Application()
    bank = Bank(auth_expiry_hours=config.auth_expiry_hours, extra_accounts=config.extra_accounts)
    database = Database(pool_size=config.db_pool_size, transaction_ms=config.db_transaction_ms)
    app[STATE] = State(config=config, bank=bank, chaos=Chaos(**config.chaos.as_dict()), database=database)
    app.cleanup_ctx.append(_sweeper)
    app.router.add_post("/api/v1/authorizations", api_post(Bank.authorize, Bank.card_account))
    app.router.add_post("/api/v1/captures", api_post(Bank.capture, Bank.authorization_account))
    app.router.add_post("/api/v1/voids", api_post(Bank.void, Bank.authorization_account))
    app.router.add_post("/api/v1/refunds", api_post(Bank.refund, Bank.capture_account))
    app.router.add_get("/api/v1/authorizations/{id}", api_get(Bank.get_authorization), allow_head=False)
    app.router.add_get("/api/v1/captures/{id}", api_get(Bank.get_capture), allow_head=False)
    app.router.add_get("/api/v1/refunds/{id}", api_get(Bank.get_refund), allow_head=False)
    app.router.add_get("/health", health, allow_head=False)
    app.router.add_get("/_mock/ledger", mock_ledger)
    app.router.add_get("/_mock/accounts", mock_accounts)
    app.router.add_get("/_mock/chaos", mock_chaos_get)
    app.router.add_put("/_mock/chaos", mock_chaos_put)
    app.router.add_patch("/_mock/chaos", mock_chaos_put)
    app.router.add_post("/_mock/authorizations/{id}/expire", mock_expire)
    app.router.add_post("/_mock/idempotency/expire", mock_idempotency_expire)
    app.router.add_post("/_mock/reset", mock_reset)
    app.router.add_post("/_mock/faults", mock_faults_add)
    app.router.add_get("/_mock/faults", mock_faults_list)
    app.router.add_delete("/_mock/faults", mock_faults_clear)
    return app


async def serve(host: str, port: int, config: Config, stop: asyncio.Event) -> None:
    app = build_app(config)
    debug = config.log_level == "debug"
    runner = web.AppRunner(app, access_log=log if debug else None, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"mockbank: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    addresses = ", ".join(f"{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple))
    chaos = config.chaos
    log.info(
        "mockbank listening on %s (latency %g-%g ms, failure_rate %g, response_loss_rate %g, "
        "key_forget_rate %g, key_lookup_failure_rate %g, response_cutoff_seconds %g, "
        "db_transaction_ms %g, db_pool_size %d, auth_expiry_hours %g, extra_accounts %d)",
        addresses,
        chaos.min_latency_ms,
        chaos.max_latency_ms,
        chaos.failure_rate,
        chaos.response_loss_rate,
        chaos.key_forget_rate,
        chaos.key_lookup_failure_rate,
        config.response_cutoff_seconds,
        config.db_transaction_ms,
        config.db_pool_size,
        config.auth_expiry_hours,
        config.extra_accounts,
    )
    try:
        await stop.wait()
    finally:
        log.info("mockbank stopping")
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mockbank",
        description="In-memory mock of the card bank (docs/bank.md) with chaos switches.",
        epilog=epilog(Config) + " Test endpoints live under /_mock/ (see the mockbank.server "
        "module docstring). A bad environment value exits with code 2.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8787, help="TCP port to listen on (default 8787; 0 picks a free one)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"mockbank: --port {args.port} is out of range 0-65535", file=sys.stderr)
        return 2
    config = Config.load()
    process.give_way(config.nice)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    process.run(lambda stop: serve(args.host, args.port, config, stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
