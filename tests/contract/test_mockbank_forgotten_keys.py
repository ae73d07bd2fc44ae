"""The upstream bank's idempotency gaps (docs/bank.md, "Idempotency at the bank").

The bank writes a remembered response after the commit, tied to the client's
connection: a client gone at that moment leaves the work done and the key not
remembered. And a failed key lookup runs the request as new. Both are off by
default; here they are forced deterministically (/_mock/faults) and by rate
(KEY_FORGET_RATE, KEY_LOOKUP_FAILURE_RATE at 1.0 and 0.0).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.contract.bankclient import HAPPY, BankClient, Reply, running_bank

ALREADY_DONE = {
    "capture": "authorization_already_used",
    "void": "authorization_already_used",
    "refund": "already_refunded",
}
BOOK = {"capture": "captures", "void": "voids", "refund": "refunds"}


async def arm(bank: BankClient, action: str, path: str, **extra) -> dict:
    reply = await bank.post("/_mock/faults", {"action": action, "path": path, **extra}, key=None)
    assert reply.status == 201, reply.text
    return reply.json()


async def stats(bank: BankClient) -> dict:
    return (await bank.ledger())["stats"]


async def operation_on_fresh_target(bank: BankClient, op: str, key: str):
    """A callable running ``op`` with ``key`` on a new authorization (or capture)."""
    auth = (await bank.authorize(HAPPY, 500)).json()
    if op == "capture":
        return lambda: bank.capture(auth["authorization_id"], 500, key=key)
    if op == "void":
        return lambda: bank.void(auth["authorization_id"], key=key)
    cap = (await bank.capture(auth["authorization_id"], 500)).json()
    return lambda: bank.refund(cap["capture_id"], 500, key=key)


def assert_already_done(reply: Reply, op: str) -> None:
    assert reply.status == 400, reply.text
    assert reply.json()["error"] == ALREADY_DONE[op]
    assert not reply.replayed


async def assert_second_hold(bank: BankClient, key: str, first_id: str | None = None) -> None:
    again = await bank.authorize(HAPPY, 2500, key=key)
    assert again.status == 200 and not again.replayed
    ledger = await bank.ledger()
    holds = [a for a in ledger["authorizations"] if a["idempotency_key"] == key]
    assert len(holds) == 2, holds
    if first_id is not None:
        assert holds[0]["authorization_id"] == first_id
    assert holds[1]["authorization_id"] == again.json()["authorization_id"]
    assert (await bank.account(HAPPY))["available"] == 1_000_000 - 2 * 2500


async def wait_for_authorization(bank: BankClient, key: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ledger = await bank.ledger()
        found = [a for a in ledger["authorizations"] if a["idempotency_key"] == key]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "the bank never did the work"
        await asyncio.sleep(0.05)


async def abandon_authorization(bank: BankClient, key: str, *, after: float) -> None:
    """A real client that gives up (closes its connection) while the bank is working."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=after)) as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await impatient.post(
                bank.base_url + "/api/v1/authorizations",
                json={**HAPPY, "amount": 2500},
                headers={"Idempotency-Key": key},
            )


# ----------------------------------------------------------- forget_key fault
async def test_forget_key_on_authorization_then_repeat_places_a_second_hold(bank):
    await arm(bank, "forget_key", "/api/v1/authorizations")
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 2500, key="forgot-auth")
    ledger = await bank.ledger()
    [first] = ledger["authorizations"]
    assert first["idempotency_key"] == "forgot-auth"  # the work is done...
    assert ledger["idempotency_entries"] == 0  # ...and the key not remembered
    assert ledger["stats"]["keys_forgotten"] == 1 and ledger["stats"]["lost_responses"] == 1
    await assert_second_hold(bank, "forgot-auth", first["authorization_id"])


@pytest.mark.parametrize("op", ["capture", "void", "refund"])
async def test_forget_key_then_repeat_is_refused_without_a_replayed_body(bank, op):
    call = await operation_on_fresh_target(bank, op, "forgot-op")
    path = f"/api/v1/{BOOK[op]}"
    await arm(bank, "forget_key", path)
    with pytest.raises(aiohttp.ClientConnectionError):
        await call()
    assert len((await bank.ledger())[BOOK[op]]) == 1  # done once
    assert_already_done(await call(), op)
    ledger = await bank.ledger()
    assert len(ledger[BOOK[op]]) == 1  # and not twice
    assert ledger["stats"]["keys_forgotten"] == 1


async def test_forget_key_skips_the_failure_roll_and_is_post_only(bank):
    await bank.chaos(failure_rate=1.0)
    await arm(bank, "forget_key", "/api/v1/*")
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 100, key="always-done")
    assert len((await bank.ledger())["authorizations"]) == 1
    for action in ("forget_key", "lookup_fails"):
        reply = await bank.post("/_mock/faults", {"action": action, "path": "/api/v1/*", "method": "GET"}, key=None)
        assert reply.status == 400 and reply.json()["error"] == "invalid_fault"
    armed = await arm(bank, "forget_key", "/api/v1/*")
    assert armed["method"] == "POST"
    await bank.chaos(failure_rate=0.0)
    assert (await bank.get("/api/v1/authorizations/auth_x")).status == 404  # a GET does not take it
    assert (await bank.get("/_mock/faults")).json()["faults"][0]["remaining"] == 1


async def test_lose_response_fault_still_remembers_even_with_forget_rate_1(bank):
    await bank.chaos(key_forget_rate=1.0)
    await arm(bank, "lose_response", "/api/v1/authorizations")
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 2500, key="lost-but-kept")
    retry = await bank.authorize(HAPPY, 2500, key="lost-but-kept")
    assert retry.status == 200 and retry.replayed
    assert len((await bank.ledger())["authorizations"]) == 1


# --------------------------------------------------------- lookup_fails fault
async def test_lookup_fails_on_a_remembered_authorization_runs_it_again(bank):
    first = await bank.authorize(HAPPY, 2500, key="hiccup")
    await arm(bank, "lookup_fails", "/api/v1/authorizations")
    await assert_second_hold(bank, "hiccup", first.json()["authorization_id"])
    assert (await stats(bank))["lookup_failures"] == 1
    # the response remembered first is the one replayed from now on
    third = await bank.authorize(HAPPY, 2500, key="hiccup")
    assert third.replayed and third.body == first.body


@pytest.mark.parametrize("op", ["capture", "void", "refund"])
async def test_lookup_fails_on_a_remembered_key_is_refused_as_already_done(bank, op):
    call = await operation_on_fresh_target(bank, op, "hiccup-op")
    first = await call()
    assert first.status == 200
    await arm(bank, "lookup_fails", f"/api/v1/{BOOK[op]}")
    assert_already_done(await call(), op)
    replay = await call()  # the fault is used up: the key is still remembered
    assert replay.replayed and replay.body == first.body


async def test_lookup_fails_is_taken_only_by_a_remembered_key(bank):
    await arm(bank, "lookup_fails", "/api/v1/authorizations")
    fresh = await bank.authorize(HAPPY, 100, key="new-key")
    assert fresh.status == 200
    assert (await bank.get("/_mock/faults")).json()["faults"][0]["remaining"] == 1
    assert (await stats(bank))["lookup_failures"] == 0
    again = await bank.authorize(HAPPY, 100, key="new-key")
    assert again.status == 200 and not again.replayed
    assert (await bank.get("/_mock/faults")).json()["faults"] == []


# ------------------------------------------------------------------ by rate
async def test_forget_rate_1_with_lost_responses_forgets_every_key(bank):
    await bank.chaos(response_loss_rate=1.0, key_forget_rate=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 2500, key="lost-and-forgotten")
    auth = await wait_for_authorization(bank, "lost-and-forgotten")
    await bank.chaos(response_loss_rate=0.0)
    await assert_second_hold(bank, "lost-and-forgotten", auth["authorization_id"])
    assert (await stats(bank))["keys_forgotten"] == 1


async def test_forget_rate_0_with_lost_responses_remembers_as_before(bank):
    await bank.chaos(response_loss_rate=1.0, key_forget_rate=0.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 2500, key="lost-kept")
    retry = await bank.authorize(HAPPY, 2500, key="lost-kept")
    assert retry.status == 200 and retry.replayed
    assert (await stats(bank))["keys_forgotten"] == 0


async def test_forget_rate_1_answered_requests_keep_their_keys(bank):
    # Only a client that is gone at the commit makes the bank forget.
    await bank.chaos(key_forget_rate=1.0)
    first = await bank.authorize(HAPPY, 2500, key="answered")
    assert first.status == 200
    assert (await bank.authorize(HAPPY, 2500, key="answered")).replayed
    assert (await stats(bank))["keys_forgotten"] == 0


async def test_client_that_disconnects_mid_request_leaves_work_done_and_key_forgotten(bank):
    await bank.chaos(min_latency_ms=400, max_latency_ms=400, key_forget_rate=1.0)
    await abandon_authorization(bank, "walked-away", after=0.1)
    auth = await wait_for_authorization(bank, "walked-away")
    ledger = await bank.ledger()
    assert ledger["idempotency_entries"] == 0
    assert ledger["stats"]["clients_gone"] == 1 and ledger["stats"]["keys_forgotten"] == 1
    await bank.chaos(min_latency_ms=0, max_latency_ms=0)
    await assert_second_hold(bank, "walked-away", auth["authorization_id"])


@pytest.mark.parametrize("op", ["capture", "refund"])
async def test_client_that_disconnects_mid_operation_then_repeats_is_refused(bank, op):
    call = await operation_on_fresh_target(bank, op, "walked-away-op")
    await bank.chaos(min_latency_ms=400, max_latency_ms=400, key_forget_rate=1.0)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call(), timeout=0.1)
    await asyncio.sleep(0.5)
    assert len((await bank.ledger())[BOOK[op]]) == 1
    await bank.chaos(min_latency_ms=0, max_latency_ms=0)
    assert_already_done(await call(), op)


async def test_client_that_disconnects_with_forgetting_off_finds_its_answer_replayed(bank):
    await bank.chaos(min_latency_ms=400, max_latency_ms=400)  # key_forget_rate 0: the default
    await abandon_authorization(bank, "walked-away-kept", after=0.1)
    auth = await wait_for_authorization(bank, "walked-away-kept")
    await bank.chaos(min_latency_ms=0, max_latency_ms=0)
    retry = await bank.authorize(HAPPY, 2500, key="walked-away-kept")
    assert retry.status == 200 and retry.replayed
    assert retry.json()["authorization_id"] == auth["authorization_id"]
    ledger = await bank.ledger()
    assert len(ledger["authorizations"]) == 1
    assert ledger["stats"]["clients_gone"] == 1 and ledger["stats"]["keys_forgotten"] == 0


async def test_lookup_failure_rate_1_runs_remembered_keys_again(bank):
    first = await bank.authorize(HAPPY, 2500, key="flaky-db")
    auth_id = first.json()["authorization_id"]
    cap = await bank.capture(auth_id, 2500, key="flaky-db-cap")
    assert cap.status == 200
    await bank.chaos(key_lookup_failure_rate=1.0)
    await assert_second_hold(bank, "flaky-db", auth_id)
    assert_already_done(await bank.capture(auth_id, 2500, key="flaky-db-cap"), "capture")
    assert (await stats(bank))["lookup_failures"] == 2


async def test_lookup_failure_rate_0_replays(bank):
    first = await bank.authorize(HAPPY, 2500, key="steady-db")
    await bank.chaos(key_lookup_failure_rate=0.0)
    again = await bank.authorize(HAPPY, 2500, key="steady-db")
    assert again.replayed and again.body == first.body
    assert (await stats(bank))["lookup_failures"] == 0


async def test_rates_from_the_environment():
    env = {"KEY_FORGET_RATE": "1", "KEY_LOOKUP_FAILURE_RATE": "1", "RESPONSE_LOSS_RATE": "1"}
    async with running_bank(env) as bank:
        chaos = (await bank.get("/_mock/chaos")).json()
        assert (chaos["key_forget_rate"], chaos["key_lookup_failure_rate"]) == (1, 1)
        with pytest.raises(aiohttp.ClientConnectionError):
            await bank.authorize(HAPPY, 2500, key="env-forgot")
        await bank.chaos(response_loss_rate=0, key_lookup_failure_rate=0)
        await assert_second_hold(bank, "env-forgot")
        ledger = await bank.ledger()
        assert ledger["stats"]["keys_forgotten"] == 1 and ledger["stats"]["lookup_failures"] == 1
