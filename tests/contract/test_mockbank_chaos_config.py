"""Chaos switches and start-up configuration, each on its own mockbank process."""

from __future__ import annotations

import asyncio
from datetime import datetime

import aiohttp
import pytest

from harness.procs import ScriptProcess, free_port, run_script
from mockbank.cards import extra_card, luhn_valid
from tests.contract.bankclient import CARDS, HAPPY, running_bank


async def test_failure_rate_1_gives_500_without_side_effects():
    async with running_bank({"FAILURE_RATE": "1"}) as bank:
        reply = await bank.authorize(HAPPY, 100, key="k500")
        assert reply.status == 500 and reply.json()["error"] == "internal_error"
        for call in (
            bank.capture("auth_x", 1),
            bank.void("auth_x"),
            bank.refund("cap_x", 1),
            bank.get("/api/v1/authorizations/auth_x"),
            bank.get("/api/v1/captures/cap_x"),
            bank.get("/api/v1/refunds/ref_x"),
        ):
            failed = await call
            assert failed.status == 500 and failed.json()["error"] == "internal_error"
        assert (await bank.get("/health")).status == 200  # /health is exempt
        ledger = await bank.ledger()
        assert ledger["authorizations"] == [] and ledger["idempotency_entries"] == 0
        assert all(a["available"] == a["balance"] for a in ledger["accounts"])
        assert ledger["stats"]["injected_failures"] == 7
        # a 500 is not remembered: the same key runs again once the bank behaves
        await bank.chaos(failure_rate=0)
        retry = await bank.authorize(HAPPY, 100, key="k500")
        assert retry.status == 200 and not retry.replayed


async def test_response_loss_does_the_work_and_replays():
    async with running_bank({"RESPONSE_LOSS_RATE": "1"}) as bank:
        with pytest.raises(aiohttp.ClientConnectionError):
            await bank.authorize(HAPPY, 2500, key="lost")
        ledger = await bank.ledger()
        assert len(ledger["authorizations"]) == 1
        auth = ledger["authorizations"][0]
        assert auth["idempotency_key"] == "lost"
        assert ledger["accounts"][0]["available"] == 997_500
        retry = await bank.authorize(HAPPY, 2500, key="lost")
        assert retry.status == 200 and retry.replayed
        assert retry.json()["authorization_id"] == auth["authorization_id"]
        got = await bank.get(f"/api/v1/authorizations/{auth['authorization_id']}")
        assert got.status == 200  # GETs are not subject to response loss
        assert len((await bank.ledger())["authorizations"]) == 1


async def test_chaos_defaults_are_the_contract_s():
    unset = dict.fromkeys(("MIN_LATENCY_MS", "MAX_LATENCY_MS", "FAILURE_RATE", "RESPONSE_LOSS_RATE"))
    async with running_bank(unset) as bank:
        assert (await bank.get("/_mock/chaos")).json() == {
            "min_latency_ms": 100,
            "max_latency_ms": 2000,
            "failure_rate": 0.05,
            "response_loss_rate": 0,  # the switches the contract asks a good mock to add: off
            "key_forget_rate": 0,
            "key_lookup_failure_rate": 0,
            "down": False,
        }


async def test_latency_bounds_roughly_honoured():
    async with running_bank({"MIN_LATENCY_MS": "200", "MAX_LATENCY_MS": "400"}) as bank:
        replies = await asyncio.gather(
            *(bank.get("/api/v1/captures/cap_x") for _ in range(10)), *(bank.authorize(HAPPY, 100) for _ in range(10))
        )
        for reply in replies:
            assert reply.status in (200, 404)
            assert 0.19 <= reply.elapsed < 2.0
        assert (await bank.get("/health")).elapsed < 0.19


async def test_extra_accounts_generated_and_test_cards_unchanged():
    async with running_bank({"MOCKBANK_EXTRA_ACCOUNTS": "5"}) as bank:
        listing = (await bank.get("/_mock/accounts")).json()
        assert listing["total"] == 9
        accounts = listing["accounts"]
        assert [(a["card_number"], a["cvv"], a["expiry_month"], a["expiry_year"]) for a in accounts[:4]] == [
            (c["card_number"], c["cvv"], c["expiry_month"], c["expiry_year"]) for c in CARDS
        ]
        assert [a["balance"] for a in accounts[:4]] == [1_000_000, 50_000, 0, 500_000]
        for i, acct in enumerate(accounts[4:]):
            expected = extra_card(i)
            assert acct["kind"] == "extra"
            for field in ("account_id", "card_number", "cvv", "expiry_month", "expiry_year", "balance"):
                assert acct[field] == expected[field]
            assert len(acct["card_number"]) == 16 and luhn_valid(acct["card_number"])
            assert acct["balance"] == acct["available"] == 10_000_000_000
        card = extra_card(3)
        body = {k: card[k] for k in ("card_number", "cvv", "expiry_month", "expiry_year")}
        reply = await bank.authorize(body, 5_000_000_000)
        assert reply.status == 200, reply.text
        touched = (await bank.get("/_mock/ledger?accounts=touched")).json()["accounts"]
        assert [a["account_id"] for a in touched] == ["acct_1", "acct_2", "acct_3", "acct_4", "acct_x3"]
        assert touched[4]["available"] == 5_000_000_000


async def test_auth_expiry_hours_configurable():
    async with running_bank({"AUTH_EXPIRY_HOURS": "0.0002"}) as bank:  # 0.72 s
        auth = (await bank.authorize(HAPPY, 100)).json()
        created = datetime.fromisoformat(auth["created_at"].replace("Z", "+00:00"))
        expires = datetime.fromisoformat(auth["expires_at"].replace("Z", "+00:00"))
        assert abs((expires - created).total_seconds() - 0.72) < 0.01
        await asyncio.sleep(0.8)
        reply = await bank.capture(auth["authorization_id"], 100)
        assert reply.status == 400 and reply.json()["error"] == "authorization_expired"
        assert (await bank.void(auth["authorization_id"])).status == 200


@pytest.mark.parametrize(
    "env,name",
    [
        ({"FAILURE_RATE": "1.5"}, "FAILURE_RATE"),
        ({"FAILURE_RATE": "often"}, "FAILURE_RATE"),
        ({"MIN_LATENCY_MS": "-1"}, "MIN_LATENCY_MS"),
        ({"MAX_LATENCY_MS": "fast"}, "MAX_LATENCY_MS"),
        ({"MIN_LATENCY_MS": "500", "MAX_LATENCY_MS": "100"}, "MAX_LATENCY_MS"),
        ({"AUTH_EXPIRY_HOURS": "0"}, "AUTH_EXPIRY_HOURS"),
        ({"AUTH_EXPIRY_HOURS": "nan"}, "AUTH_EXPIRY_HOURS"),
        ({"RESPONSE_LOSS_RATE": "-0.1"}, "RESPONSE_LOSS_RATE"),
        ({"MOCKBANK_EXTRA_ACCOUNTS": "1.5"}, "MOCKBANK_EXTRA_ACCOUNTS"),
        ({"KEY_FORGET_RATE": "2"}, "KEY_FORGET_RATE"),
        ({"KEY_LOOKUP_FAILURE_RATE": "sometimes"}, "KEY_LOOKUP_FAILURE_RATE"),
        ({"RESPONSE_CUTOFF_SECONDS": "0"}, "RESPONSE_CUTOFF_SECONDS"),
        ({"DB_TRANSACTION_MS": "-5"}, "DB_TRANSACTION_MS"),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
        ({"DB_POOL_SIZE": "2.5"}, "DB_POOL_SIZE"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    ],
)
def test_bad_environment_exits_2_naming_the_variable(env, name):
    result = run_script("mockbank", "--port", str(free_port()), env=env, timeout=20)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_help():
    result = run_script("mockbank", "--help")
    assert result.returncode == 0
    assert "--port" in result.stdout and "FAILURE_RATE" in result.stdout


async def test_port_in_use_fails_clearly():
    async with running_bank() as bank:
        port = bank.base_url.rsplit(":", 1)[1]
        proc = ScriptProcess("mockbank", "--port", port).start()
        try:
            code = await proc.wait_exit(timeout=20)
            assert code != 0
            assert "cannot listen" in proc.stderr_tail()
        finally:
            await proc.stop()
            proc.close()
