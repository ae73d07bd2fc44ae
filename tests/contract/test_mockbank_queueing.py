"""The upstream bank under load (docs/bank.md, "Chaos"): its queueing and its 15 s cut-off.

"Requests on the same card wait for each other (the account row is locked for
the whole operation), and its database pool holds 25 connections" (the mock:
DB_TRANSACTION_MS > 0, DB_POOL_SIZE; off by default) and "it stops writing a
response after 15 s" (the mock: RESPONSE_CUTOFF_SECONDS, default 15).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from mockbank.cards import extra_card
from mockbank.config import Config
from tests.contract.bankclient import HAPPY, LIMITED, running_bank

TRANSACTION_S = 0.2


def card(index: int) -> dict:
    c = extra_card(index)
    return {k: c[k] for k in ("card_number", "cvv", "expiry_month", "expiry_year")}


async def test_requests_on_one_card_wait_for_each_other_other_cards_do_not():
    env = {"DB_TRANSACTION_MS": str(TRANSACTION_S * 1000), "MOCKBANK_EXTRA_ACCOUNTS": "4"}
    async with running_bank(env) as bank:
        # the capture locks the row of its authorization's card: it queues with them
        auth = (await bank.authorize(HAPPY, 100)).json()
        one_card = await asyncio.gather(
            *(bank.authorize(HAPPY, 100) for _ in range(3)), bank.capture(auth["authorization_id"], 100)
        )
        assert all(r.status == 200 for r in one_card)
        assert max(r.elapsed for r in one_card) >= 4 * TRANSACTION_S * 0.95
        assert min(r.elapsed for r in one_card) < 2 * TRANSACTION_S

        many_cards = await asyncio.gather(*(bank.authorize(card(i), 100) for i in range(4)))
        assert all(r.status == 200 for r in many_cards)
        assert max(r.elapsed for r in many_cards) < 2 * TRANSACTION_S
        assert (await bank.account(HAPPY))["held"] == 300


async def test_the_pool_queues_everything_once_its_connections_are_taken():
    env = {"DB_TRANSACTION_MS": str(TRANSACTION_S * 1000), "DB_POOL_SIZE": "2", "MOCKBANK_EXTRA_ACCOUNTS": "4"}
    async with running_bank(env) as bank:
        replies = await asyncio.gather(
            *(bank.authorize(card(i), 100) for i in range(4)), *(bank.get("/api/v1/captures/cap_x") for _ in range(2))
        )
        assert [r.status for r in replies] == [200] * 4 + [404] * 2
        # six transactions through two connections: three rounds
        assert max(r.elapsed for r in replies) >= 3 * TRANSACTION_S * 0.95
        # a replay is answered from memory, not through the pool
        first = await bank.authorize(HAPPY, 100, key="replayed")
        burst = asyncio.gather(*(bank.authorize(card(i), 100) for i in range(4)))
        await asyncio.sleep(0.05)
        replay = await bank.authorize(HAPPY, 100, key="replayed")
        assert replay.replayed and replay.body == first.body and replay.elapsed < TRANSACTION_S
        await burst


async def test_queueing_is_off_by_default(bank):
    replies = await asyncio.gather(*(bank.authorize(LIMITED, 100) for _ in range(50)))
    assert all(r.status == 200 for r in replies)
    assert max(r.elapsed for r in replies) < 1.0
    assert (await bank.account(LIMITED))["available"] == 50_000 - 50 * 100


async def test_switching_the_bank_down_cuts_requests_queued_for_the_database():
    async with running_bank({"DB_TRANSACTION_MS": "300"}) as bank:
        queued = asyncio.gather(*(bank.authorize(HAPPY, 100) for _ in range(3)), return_exceptions=True)
        await asyncio.sleep(0.1)
        await bank.chaos(down=True)
        outcomes = await queued
        assert all(isinstance(o, aiohttp.ClientConnectionError) for o in outcomes), outcomes
        assert (await bank.ledger())["authorizations"] == []


async def test_a_response_not_ready_by_the_cut_off_is_never_written_but_the_work_is_done():
    async with running_bank({"RESPONSE_CUTOFF_SECONDS": "0.5"}) as bank:
        fault = {"action": "delay", "path": "/api/v1/authorizations", "delay_ms": 700}
        assert (await bank.post("/_mock/faults", fault, key=None)).status == 201
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await bank.authorize(HAPPY, 2500, key="too-slow")
        ledger = await bank.ledger()
        [auth] = ledger["authorizations"]
        assert ledger["stats"]["responses_cut_off"] == 1
        # the client was still there when the key was written: a repeat replays
        retry = await bank.authorize(HAPPY, 2500, key="too-slow")
        assert retry.status == 200 and retry.replayed
        assert retry.json()["authorization_id"] == auth["authorization_id"]
        path = f"/api/v1/authorizations/{auth['authorization_id']}"
        # times 2: aiohttp silently retries a GET once after a disconnect
        fault = {"action": "delay", "path": path, "method": "GET", "delay_ms": 700, "times": 2}
        assert (await bank.post("/_mock/faults", fault, key=None)).status == 201
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await bank.get(path)
        assert (await bank.ledger())["stats"]["responses_cut_off"] == 3
        in_time = await bank.get(path)
        assert in_time.status == 200 and in_time.json() == retry.json()


async def test_queueing_past_the_cut_off_is_cut_off_too():
    # Four authorizations on one card run one after the other, 0.5 s each: the third cannot
    # finish before 1.5 s and the fourth before 2 s, both past the 1.25 s cut-off however busy
    # the machine is; the first has 0.75 s to spare. (How many of the first two are answered
    # depends on the machine's speed, so only the bounds are asserted.)
    env = {"DB_TRANSACTION_MS": "500", "RESPONSE_CUTOFF_SECONDS": "1.25"}
    async with running_bank(env) as bank:
        outcomes = await asyncio.gather(*(bank.authorize(HAPPY, 100) for _ in range(4)), return_exceptions=True)
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        cut = [o for o in outcomes if isinstance(o, aiohttp.ServerDisconnectedError)]
        assert len(answered) + len(cut) == 4, outcomes
        assert len(cut) >= 2 and len(answered) >= 1, outcomes
        ledger = await bank.ledger()
        assert len(ledger["authorizations"]) == 4  # every one was done, answered or not
        assert ledger["stats"]["responses_cut_off"] == len(cut)


def test_defaults_match_the_contract():
    config = Config.parse({})
    assert config.response_cutoff_seconds == 15
    assert config.db_pool_size == 25
    assert config.db_transaction_ms == 0  # queueing is opt-in
    assert (config.chaos.key_forget_rate, config.chaos.key_lookup_failure_rate) == (0, 0)
