"""The mock bank's own endpoints, for tests and load generators (harness/mockbank_client.py):
its books, its chaos switches and faults, and time travel. Never subject to chaos, always JSON.

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

import logging

import orjson
from aiohttp import web

from mockbank.bank_api import json_response
from mockbank.config import Chaos, ConfigError, validate_chaos_update
from mockbank.state import LOOKUP_FAULTS, POST_ONLY_FAULTS, REQUEST_FAULTS, STATE, Fault, new_stats

log = logging.getLogger("mockbank")


async def mock_ledger(request: web.Request) -> web.Response:
    state = request.app[STATE]
    accounts = request.query.get("accounts", "all")
    if accounts not in ("all", "touched"):
        return json_response(400, {"error": "invalid_request", "message": "accounts must be all or touched"})
    snapshot = state.bank.ledger(accounts)
    snapshot["chaos"] = state.chaos.as_dict()
    snapshot["stats"] = dict(state.stats)
    return json_response(200, snapshot)


async def mock_accounts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query["limit"]) if "limit" in request.query else None
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError
    except ValueError:
        return json_response(400, {"error": "invalid_request", "message": "offset/limit must be integers >= 0"})
    return json_response(
        200, {"total": len(state.bank.accounts), "accounts": state.bank.account_listing(offset, limit)}
    )


async def mock_chaos_get(request: web.Request) -> web.Response:
    return json_response(200, request.app[STATE].chaos.as_dict())


async def mock_chaos_put(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        update = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return json_response(400, {"error": "invalid_chaos", "message": "malformed JSON"})
    if not isinstance(update, dict):
        return json_response(400, {"error": "invalid_chaos", "message": "body must be a JSON object"})
    try:
        state.chaos = validate_chaos_update(state.chaos, update)
    except ConfigError as exc:
        return json_response(400, {"error": "invalid_chaos", "message": str(exc)})
    log.info("chaos changed: %s", state.chaos.as_dict())
    return json_response(200, state.chaos.as_dict())


async def mock_expire(request: web.Request) -> web.Response:
    entry = request.app[STATE].bank.expire_authorization(request.match_info["id"])
    if entry is None:
        return json_response(404, {"error": "not_found", "message": "authorization not found"})
    return json_response(200, entry)


async def mock_idempotency_expire(request: web.Request) -> web.Response:
    return json_response(200, {"forgotten": request.app[STATE].bank.idempotency.forget_all()})


async def mock_reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.bank.reset()
    state.chaos = Chaos(**state.config.chaos.as_dict())
    state.faults.clear()
    state.stats = new_stats()
    return json_response(200, {"status": "reset"})


async def mock_faults_add(request: web.Request) -> web.Response:
    state = request.app[STATE]

    def bad(msg: str) -> web.Response:
        return json_response(400, {"error": "invalid_fault", "message": msg})

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
    return json_response(201, fault.public())


async def mock_faults_list(request: web.Request) -> web.Response:
    return json_response(200, {"faults": [f.public() for f in request.app[STATE].faults]})


async def mock_faults_clear(request: web.Request) -> web.Response:
    faults = request.app[STATE].faults
    n = len(faults)
    faults.clear()
    return json_response(200, {"cleared": n})


def add_routes(router: web.UrlDispatcher) -> None:
    """The test endpoints (/_mock/*) on `router`."""
    router.add_get("/_mock/ledger", mock_ledger)
    router.add_get("/_mock/accounts", mock_accounts)
    router.add_get("/_mock/chaos", mock_chaos_get)
    router.add_put("/_mock/chaos", mock_chaos_put)
    router.add_patch("/_mock/chaos", mock_chaos_put)
    router.add_post("/_mock/authorizations/{id}/expire", mock_expire)
    router.add_post("/_mock/idempotency/expire", mock_idempotency_expire)
    router.add_post("/_mock/reset", mock_reset)
    router.add_post("/_mock/faults", mock_faults_add)
    router.add_get("/_mock/faults", mock_faults_list)
    router.add_delete("/_mock/faults", mock_faults_clear)
