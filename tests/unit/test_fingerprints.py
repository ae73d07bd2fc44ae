"""Idempotency fingerprints (gateway/fingerprints.py): keyed, without card data, stable
across spelling of the same JSON and across a card-key rotation."""

from __future__ import annotations

import hashlib
import os

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.fingerprints import LEGACY, PREFIX, Fingerprinter, matches

KEY_A, KEY_B = b"a" * 32, b"b" * 32
CARD = {"number": "4111111111111111", "cvv": "123", "expiry_month": 12, "expiry_year": 2030}
BODY = {"order_id": "ord_1", "customer_id": "cus_1", "amount": 5000, "currency": "USD", "card": CARD}


def of(body: dict | bytes, keys=(KEY_A,), path="/v1/payments") -> tuple[str, ...]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Fingerprinter(list(keys)).of("POST", path, raw)


def test_a_fingerprint_is_a_keyed_digest_and_shows_no_card_data():
    (fingerprint,) = of(BODY)
    assert fingerprint.startswith(PREFIX) and len(fingerprint) == len(PREFIX) + 64
    raw = orjson.dumps(BODY)
    for plain in (b"4111111111111111", b"123", raw):
        assert hashlib.sha256(plain).hexdigest() not in fingerprint
    assert of(BODY, keys=(KEY_B,)) != of(BODY)  # without the key, nothing to compare a guess with


def test_the_cvv_is_not_part_of_the_request():
    assert of({**BODY, "card": {**CARD, "cvv": "999"}}) == of(BODY)
    assert of({**BODY, "card": {k: v for k, v in CARD.items() if k != "cvv"}}) == of(BODY)


def test_everything_else_is():
    for changed in (
        {**BODY, "amount": 5001},
        {**BODY, "order_id": "ord_2"},
        {**BODY, "card": {**CARD, "number": "4242424242424242"}},
        {**BODY, "card": {**CARD, "expiry_month": 11}},
    ):
        assert of(changed) != of(BODY), changed
    assert of(BODY, path="/v1/payments/pay_1/capture") != of(BODY)


def test_the_same_json_spelled_differently_is_the_same_request():
    assert of(orjson.dumps(BODY, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)) == of(BODY)
    assert of(b"") == of(b"  ")


@given(st.binary(max_size=64))
def test_any_body_has_a_fingerprint(body):
    assert of(body)[0].startswith(PREFIX)


def test_written_under_the_newest_key_recognised_under_any():
    before = of(BODY, keys=(KEY_A,))[0]
    after_rotation = of(BODY, keys=(KEY_B, KEY_A))
    assert after_rotation[0] != before and matches(before, after_rotation)
    assert not matches(before, of(BODY, keys=(KEY_B,)))


def test_legacy_rows_match_and_other_fingerprints_do_not():
    assert matches(LEGACY, of(BODY))
    assert not matches(of({**BODY, "amount": 1})[0], of(BODY))
    assert not matches(hashlib.sha256(os.urandom(8)).hexdigest(), of(BODY))
