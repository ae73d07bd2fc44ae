"""gateway.redact: card numbers and CVVs never survive, ids always do."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.redact import REDACTED, clean, redact

PAN = "4111111111111111"


@pytest.mark.parametrize(
    "text",
    [
        PAN,
        f"card {PAN} declined",
        f"{PAN}cvv123",
        f"x{PAN}y",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        f'{{"card_number":"{PAN}"}}',
        f"card_{PAN}",
        "4222222222222",
        "4111111111111111111",
    ],
)
def test_card_numbers_in_any_form_are_redacted(text):
    out = redact(text)
    assert len(re.findall(r"\d", out)) < 13 or not re.search(r"\d(?:[ -]?\d){12}", out), out
    assert REDACTED in out


@pytest.mark.parametrize(
    "text, cvv",
    [
        ("cvv 123 wrong", "123"),
        ("CVV: 4567", "4567"),
        ('"cvv":"987"', "987"),
        (f"{PAN}cvv123", "123"),
        ("the cvc2=321", "321"),
        ("security code 555 invalid", "555"),
    ],
)
def test_labelled_cvvs_are_redacted(text, cvv):
    assert cvv not in redact(text)


def test_other_numbers_stay():
    text = "amount 500000 last4 1111 ref 123456789012 at 2030-01-01T00:00:00Z"
    assert redact(text) == text


@settings(max_examples=300, deadline=None)
@given(st.uuids(version=4), st.sampled_from(["pay", "op", "evt", "cmd"]))
def test_our_ids_are_kept_whole(value, prefix):
    ident = f"{prefix}_{value.hex}"
    assert redact(f"settled {ident} ok") == f"settled {ident} ok"


@settings(max_examples=300, deadline=None)
@given(st.uuids(version=4), st.sampled_from(["auth", "cap", "void", "ref"]))
def test_bank_ids_are_kept_whole(value, prefix):
    ident = f"{prefix}_{value}"
    assert redact(ident) == ident


def test_ids_with_long_digit_runs_are_kept():
    for ident in ("op_4111111111111111abcdefabcdefabcd", f"auth_{uuid.UUID(int=4111111111111111)}"):
        assert redact(ident) == ident


def test_clean_cuts_and_says_how_much():
    out = clean("a" * 5000, 300)
    assert out.startswith("a" * 300) and "4700 more characters" in out
    assert len(out) < 340


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=60))
def test_a_card_number_at_the_cut_is_never_half_shown(offset):
    limit = 100
    text = "x" * (limit - offset) + "4111 1111 1111 1111" + "y" * 200
    out = clean(text, limit)
    assert not re.search(r"\d", out.split("...[")[0]), out


@pytest.mark.parametrize("limit", [10_000, 30])
def test_printable_removes_controls_before_it_redacts(limit):
    """A NUL (refused by jsonb) or any other unprintable character goes, and a card number it
    split is joined up before the redaction looks, so it cannot come back whole afterwards."""
    text = "card 4111\x001111\x1f1111\u202e1111 ok\x00" + "z" * 40
    out = clean(text, limit, printable=True)
    assert out.isprintable() and "4111" not in out and out.startswith(f"card {REDACTED} ok")
    assert "4111\x001111" in clean(text, limit)  # without it, text is only redacted


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("connect postgresql://gateway:s3cret@db:5432/gateway failed", "postgresql://gateway:***@db:5432/gateway"),
        ("amqp://gateway:s3c/ret@rabbit:5672/", "amqp://gateway:***@rabbit:5672/"),
        ("postgresql://db/gateway?user=g&password=s3cret&sslmode=require", "password=***&sslmode=require"),
        ("postgresql://a:s3cret@h1:5432,h2:5432/db", "postgresql://a:***@h1:5432,h2:5432/db"),
    ],
)
def test_url_passwords_are_hidden_wherever_text_is_redacted(text, shown):
    for out in (redact(text), clean(text, 10_000)):
        assert "s3c" not in out
    assert shown in redact(text)


def test_a_long_password_at_the_cut_is_never_half_shown():
    text = "x" * 80 + "postgresql://gateway:" + "s3c" * 100 + "@db/gateway"
    assert "s3c" not in clean(text, 120)


def test_urls_without_a_password_stay():
    text = "postgresql://postgres@127.0.0.1:5432/gateway and http://127.0.0.1:8787/x and ops:alice:resolve:bob@bank"
    assert redact(text) == text
