"""Idempotency at the bank and the requests it cannot parse (docs/bank.md)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.contract.bankclient import HAPPY, LIMITED

POST_PATHS = ["/api/v1/authorizations", "/api/v1/captures", "/api/v1/voids", "/api/v1/refunds"]


def assert_plain_400(reply) -> None:
    assert reply.status == 400, (reply.status, reply.text)
    assert reply.headers["Content-Type"].startswith("text/plain")
    with pytest.raises(ValueError):
        json.loads(reply.body)


@pytest.mark.parametrize("path", POST_PATHS)
async def test_missing_idempotency_key_is_plain_text_400(bank, path):
    assert_plain_400(await bank.post(path, {**HAPPY, "amount": 100}, key=None))


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_empty_or_overlong_idempotency_key_is_plain_text_400(bank, key):
    assert_plain_400(await bank.authorize(HAPPY, 100, key=key))
    assert (await bank.ledger())["authorizations"] == []


@pytest.mark.parametrize("key", ["k", "k" * 255])
async def test_idempotency_key_of_1_to_255_chars_accepted(bank, key):
    assert (await bank.authorize(HAPPY, 100, key=key)).status == 200


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"'])
@pytest.mark.parametrize("path", POST_PATHS)
async def test_unparseable_body_is_plain_text_400(bank, path, raw):
    assert_plain_400(await bank.post(path, raw=raw))


async def test_replay_returns_identical_bytes_with_header_and_ignores_new_body(bank):
    first = await bank.authorize(HAPPY, 1000, key="same-key")
    assert first.status == 200 and not first.replayed
    second = await bank.authorize(LIMITED, 2000, key="same-key")
    assert second.status == 200
    assert second.replayed
    assert second.body == first.body
    third = await bank.post("/api/v1/authorizations", raw=b"{garbage", key="same-key")
    assert third.replayed and third.body == first.body
    ledger = await bank.ledger()
    assert len(ledger["authorizations"]) == 1
    assert ledger["authorizations"][0]["idempotency_key"] == "same-key"
    accounts = {a["card_last4"]: a for a in ledger["accounts"]}
    assert accounts["1111"]["available"] == 999_000
    assert accounts["4242"]["available"] == 50_000


@pytest.mark.parametrize("op", ["capture", "void", "refund"])
async def test_replay_of_each_operation(bank, op):
    auth = (await bank.authorize(HAPPY, 500)).json()
    if op == "capture":
        call = lambda: bank.capture(auth["authorization_id"], 500, key="op-key")  # noqa: E731
    elif op == "void":
        call = lambda: bank.void(auth["authorization_id"], key="op-key")  # noqa: E731
    else:
        cap = (await bank.capture(auth["authorization_id"], 500)).json()
        call = lambda: bank.refund(cap["capture_id"], 500, key="op-key")  # noqa: E731
    first, second = await call(), await call()
    assert first.status == 200 and second.status == 200
    assert second.replayed and second.body == first.body
    ledger = await bank.ledger()
    assert len(ledger[{"capture": "captures", "void": "voids", "refund": "refunds"}[op]]) == 1


async def test_errors_are_not_remembered(bank):
    hold = (await bank.authorize(LIMITED, 50_000)).json()
    refused = await bank.authorize(LIMITED, 100, key="retry-me")
    assert refused.status == 402
    again = await bank.authorize(LIMITED, 100, key="retry-me")
    assert again.status == 402 and not again.replayed
    await bank.void(hold["authorization_id"])  # funds are back
    fixed = await bank.authorize(LIMITED, 100, key="retry-me")
    assert fixed.status == 200 and not fixed.replayed


async def test_400_business_error_not_remembered(bank):
    auth = (await bank.authorize(HAPPY, 700)).json()
    wrong = await bank.capture(auth["authorization_id"], 1, key="cap-key")
    assert wrong.json()["error"] == "amount_mismatch"
    right = await bank.capture(auth["authorization_id"], 700, key="cap-key")
    assert right.status == 200 and not right.replayed


async def test_plain_text_400_not_remembered(bank):
    bad = await bank.post("/api/v1/authorizations", raw=b"{", key="parse-key")
    assert bad.status == 400
    good = await bank.authorize(HAPPY, 100, key="parse-key")
    assert good.status == 200 and not good.replayed


async def test_key_scoped_per_path(bank):
    auth = await bank.authorize(HAPPY, 800, key="shared")
    auth_id = auth.json()["authorization_id"]
    cap = await bank.capture(auth_id, 800, key="shared")
    assert cap.status == 200 and not cap.replayed
    assert "capture_id" in cap.json()
    other = (await bank.authorize(HAPPY, 900)).json()
    void = await bank.void(other["authorization_id"], key="shared")
    assert void.status == 200 and not void.replayed


async def test_same_key_same_path_replays_even_for_another_target(bank):
    a1 = (await bank.authorize(HAPPY, 100)).json()
    a2 = (await bank.authorize(HAPPY, 200)).json()
    first = await bank.void(a1["authorization_id"], key="void-key")
    second = await bank.void(a2["authorization_id"], key="void-key")
    assert second.replayed and second.body == first.body
    statuses = {a["authorization_id"]: a["status"] for a in (await bank.ledger())["authorizations"]}
    assert statuses == {a1["authorization_id"]: "voided", a2["authorization_id"]: "open"}


async def test_concurrent_same_key_requests_both_execute(bank):
    await bank.chaos(min_latency_ms=300, max_latency_ms=300)
    r1, r2 = await asyncio.gather(bank.authorize(HAPPY, 1000, key="racy"), bank.authorize(HAPPY, 1000, key="racy"))
    assert r1.status == r2.status == 200
    assert not r1.replayed and not r2.replayed
    assert r1.json()["authorization_id"] != r2.json()["authorization_id"]
    ledger = await bank.ledger()
    assert [a["idempotency_key"] for a in ledger["authorizations"]] == ["racy", "racy"]
    assert (await bank.account(HAPPY))["available"] == 998_000
    third = await bank.authorize(HAPPY, 1000, key="racy")
    assert third.replayed and third.body in (r1.body, r2.body)


async def test_replay_skips_latency_and_failure_injection(bank):
    first = await bank.authorize(HAPPY, 100, key="fast")
    await bank.chaos(min_latency_ms=600, max_latency_ms=600, failure_rate=1.0)
    replay = await bank.authorize(HAPPY, 100, key="fast")
    assert replay.status == 200 and replay.replayed and replay.body == first.body
    assert replay.elapsed < 0.5
    fresh = await bank.authorize(HAPPY, 100)
    assert fresh.status == 500 and fresh.json()["error"] == "internal_error"
    assert fresh.elapsed >= 0.55


async def test_remembered_responses_can_be_forgotten(bank):
    # Stand-in for the 24 h expiry: the mock forgets everything on request.
    first = await bank.authorize(HAPPY, 100, key="old")
    forgot = await bank.post("/_mock/idempotency/expire", key=None, raw=b"")
    assert forgot.status == 200 and forgot.json() == {"forgotten": 1}
    again = await bank.authorize(HAPPY, 100, key="old")
    assert again.status == 200 and not again.replayed
    assert again.json()["authorization_id"] != first.json()["authorization_id"]
