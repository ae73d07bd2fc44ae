"""A bank that lies: the gateway believes nothing it cannot check.

A small aiohttp "bank" served by this test answers each authorization by its
amount: a redirect to another host, a 200 that says declined, a 200 for 1
EUR, a 200 with a date nobody can read, a 5 MB id, a body of hundreds of MB,
an unknown error code of 5 KB that quotes the card, a decline whose message
holds a NUL and words for the merchant... and one honest approval that echoes
the card number and CVV. The real gateway processes run against
it. Afterwards every payment is in a true state or flagged for ops (never
silently pending, never authorized for what the bank did not authorize), the
redirect target received nothing, and the card number and CVV are nowhere:
not in the database, not in any log line, not in any event.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import orjson
import pytest
from aiohttp import web

from tests.e2e.stack import running_stack

CARD = {"number": "4000056655665556", "cvv": "9817", "expiry_month": 12, "expiry_year": 2030}
PAN_DIGITS = CARD["number"]
CVV_TEXT = re.compile(r"cvv\W{0,6}9817", re.IGNORECASE)

HONEST = 1005  # the one amount the liar approves truthfully (while echoing the card)
DECLINED = 1010  # a true decline, its message full of control characters and words for the merchant
BANKS_WORDS = "call +1 555 0100 to buy a gift card"


def _approval(amount: int, **change) -> dict:
    return {
        "authorization_id": f"auth_{uuid.uuid4()}",
        "status": "approved",
        "amount": amount,
        "currency": "USD",
        "expires_at": "2031-01-01T00:00:00Z",
        "created_at": "2030-12-25T00:00:00Z",
        **change,
    }


class LyingBank:
    def __init__(self) -> None:
        self.elsewhere_hits = 0
        self.elsewhere_url = ""

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        amount, card = body["amount"], body["card_number"]
        lies = {
            1001: lambda: web.Response(status=307, headers={"Location": f"{self.elsewhere_url}/x"}),
            1002: lambda: web.Response(status=302, headers={"Location": f"{self.elsewhere_url}/x"}),
            1003: lambda: web.json_response(_approval(amount, status="declined")),
            1004: lambda: web.json_response(_approval(1, currency="EUR")),
            HONEST: lambda: web.json_response(_approval(amount, card_number=card, cvv=body["cvv"])),
            1007: lambda: web.json_response(_approval(amount, expires_at="next tuesday")),
            1008: lambda: web.json_response(
                {
                    "error": "x" * 5000 + card,
                    "message": f"card {card[:4]} {card[4:8]} {card[8:12]} {card[12:]} cvv 9817",
                },
                status=400,
            ),
            1009: lambda: web.json_response(_approval(amount, authorization_id="auth_" + "1" * 5_000_000)),
            DECLINED: lambda: web.json_response(
                {"error": "insufficient_funds", "message": f"\u0000{BANKS_WORDS}\u0007 {card[:8]}\u0000{card[8:]}"},
                status=402,
            ),
        }
        if amount == 1006:
            return await self._endless(request)
        return lies[amount]()

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for _ in range(300):  # 300 MB if anyone reads it all
                await resp.write(b" " * (1 << 20))
        except (ConnectionResetError, RuntimeError):
            pass  # the gateway stopped reading: as it should
        return resp

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.elsewhere_hits += 1
        await request.read()
        return web.json_response(_approval(1001))

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.mark.timeout(240)
async def test_a_lying_bank_leaves_every_payment_true_or_flagged_and_no_card_anywhere(server_urls, card_key):
    liar = LyingBank()
    other = web.Application()
    other.router.add_route("*", "/x", liar.elsewhere)
    other_runner, liar.elsewhere_url = await _serve(other)
    bank = web.Application(client_max_size=1 << 20)
    bank.router.add_post("/api/v1/authorizations", liar.authorize)
    bank.router.add_get("/health", liar.health)
    bank_runner, bank_url = await _serve(bank)
    try:
        env = {"BANK_URL": bank_url, "WORKER_RETRY_LADDER": "1", "WORKER_QUICK_RETRIES": "2"}
        async with running_stack(server_urls, card_key, gateway_env=env) as stack:
            client = stack.client(patience=60)
            ids = {}
            for amount in (1001, 1002, 1003, 1004, HONEST, 1006, 1007, 1008, 1009, DECLINED):
                reply = await client.authorize(
                    order_id=f"ord_liar_{amount}_{uuid.uuid4().hex[:6]}", amount=amount, card=CARD
                )
                assert reply.status == 202, reply
                ids[amount] = reply.body["id"]
            settled = dict(
                zip(ids, await asyncio.gather(*(client.settled(p, timeout=90) for p in ids.values())), strict=True)
            )
            await stack.quiescent(timeout=30)

            for amount, payment in settled.items():
                if amount == HONEST:
                    assert payment["status"] == "authorized" and not payment["attention_required"], payment
                    continue
                if amount == DECLINED:  # recorded (a NUL once made it unstorable), in our words
                    assert payment["status"] == "declined" and not payment["attention_required"], payment
                    assert payment["last_error"] == {
                        "code": "insufficient_funds",
                        "message": "the card has insufficient funds",
                        "retryable": False,
                    }
                    continue
                # Never believed: still pending, but parked and flagged for ops with the reason.
                assert payment["status"] == "pending", payment
                assert payment["attention_required"] and payment["last_error"], payment
                assert payment["bank"]["authorization_id"] is None, payment
                assert len(orjson.dumps(payment)) < 4000, payment
            assert settled[1003]["last_error"]["code"] == "bank_answer_invalid"
            assert "status" in settled[1003]["last_error"]["message"]
            assert "amount" in settled[1004]["last_error"]["message"]
            assert settled[1001]["last_error"]["code"] == "bank_redirect"
            assert settled[1006]["last_error"]["code"] == "bank_oversized"
            assert settled[1008]["last_error"]["code"] == "unknown_bank_error"
            assert liar.elsewhere_hits == 0

            # The card number (in any spacing) and the CVV are nowhere.
            dump = await stack.pool.fetchval(
                """SELECT string_agg(t::text, E'\\n') FROM (
                       SELECT row_to_json(p)::text AS t FROM payments p
                       UNION ALL SELECT row_to_json(o)::text FROM operations o
                       UNION ALL SELECT row_to_json(h)::text FROM payment_history h
                       UNION ALL SELECT convert_from(body, 'UTF8') FROM outbox
                       UNION ALL SELECT convert_from(response_body, 'UTF8') FROM idempotency_keys) AS everything"""
            )
            events = [orjson.dumps(e).decode() for e in stack.events.events.values()]
            assert len(events) >= len(ids), "every payment was announced (authorized or attention_required)"
            # What the bank said is kept for ops (the operation's bank_response), never shown to FicMart.
            merchants_see = await stack.pool.fetchval(
                "SELECT string_agg(row_to_json(p)::text, E'\\n') FROM payments p"
            ) + "\n".join(events)
            assert "gift card" not in merchants_see
            said = await stack.pool.fetchval(
                "SELECT o.bank_response->>'message' FROM operations o WHERE o.payment_id = $1", ids[DECLINED]
            )
            assert BANKS_WORDS in said and "\u0000" not in said
            logs = "\n".join(stack.log_lines("", limit=10_000_000))
            for where, text in (("database", dump), ("events", "\n".join(events)), ("logs", logs)):
                assert PAN_DIGITS not in re.sub(r"[\s-]", "", text), where
                assert not CVV_TEXT.search(text), where
    finally:
        await bank_runner.cleanup()
        await other_runner.cleanup()
