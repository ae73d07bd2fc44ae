"""Webhook rules: which URLs may be called, the signature's format, rotation, the retry window,
and secrets at rest."""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta

import pytest

from gateway.cards import CardKey
from gateway.webhook_rules import (
    SecretBox,
    SecretUnreadable,
    UrlRefused,
    address_allowed,
    check_url,
    gives_up,
    new_secret,
    signature,
    signing_secrets,
)


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example.com/hooks/gateway",
        "https://shop.example.com:8443/h?x=1",
        "https://93.184.216.34/hook",
    ],
)
def test_public_https_urls_are_accepted_everywhere(url):
    assert check_url(url, development=False) == url
    assert check_url(url, development=True) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://shop.example.com/hook", "must be https"),
        ("ftp://shop.example.com/hook", "must be https"),
        ("http://127.0.0.1:9000/hook", "must be https"),  # loopback http: development only
        ("https://localhost/hook", "loopback host"),
        ("https://api.localhost/hook", "loopback host"),
        ("https://127.0.0.1/hook", "not a public address"),
        ("https://10.1.2.3/hook", "not a public address"),
        ("https://192.168.0.10/hook", "not a public address"),
        ("https://172.16.5.5/hook", "not a public address"),
        ("https://169.254.169.254/latest/meta-data", "not a public address"),  # cloud metadata
        ("https://100.64.0.1/hook", "not a public address"),  # carrier-grade NAT
        ("https://[::1]/hook", "not a public address"),
        ("https://[fd00::1]/hook", "not a public address"),
        ("https://[::ffff:10.0.0.1]/hook", "not a public address"),
        ("https://[fe80::1%25eth0]/hook", "not a public address"),
        ("https://0.0.0.0/hook", "not a public address"),
        ("https://user:pw@shop.example.com/hook", "credentials"),
        ("https://shop.example.com/hook#frag", "fragment"),
        ("https:///hook", "no host"),
        ("https://shop.example.com:99999/hook", "valid port"),
        ("https://shop.example.com/ho ok", "printable ASCII"),
        ("https://shop.example.com/" + "a" * 2048, "printable ASCII"),
    ],
)
def test_urls_refused_in_production(url, why):
    with pytest.raises(UrlRefused, match=why):
        check_url(url, development=False)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://localhost:9000/hook", "https://10.0.0.5/x"])
def test_development_mode_may_call_loopback_and_private_hosts(url):
    assert check_url(url, development=True) == url


def test_plain_http_stays_refused_to_a_remote_host_in_development():
    with pytest.raises(UrlRefused, match="must be https"):
        check_url("http://shop.example.com/hook", development=True)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1::1", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("::ffff:192.168.1.1", False),
        ("224.0.0.1", False),
        ("fe80::1", False),
        ("not-an-address", False),
    ],
)
def test_resolved_addresses_are_judged_outside_development(address, allowed):
    assert address_allowed(address, development=False) is allowed
    assert address_allowed(address, development=True) is True


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def test_the_signature_is_an_hmac_of_timestamp_and_raw_body_per_secret():
    body = b'{"event_id":"evt_1","type":"payment.captured"}'
    one, two = new_secret(), new_secret()
    assert one != two and one.startswith("whsec_") and len(one) > 40
    assert signature([one], 1_700_000_000, body) == f"t=1700000000,v1={_mac(one, 1_700_000_000, body)}"
    assert signature([one, two], 5, body) == f"t=5,v1={_mac(one, 5, body)},v1={_mac(two, 5, body)}"


def test_the_old_secret_signs_until_its_overlap_ends():
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert signing_secrets("new", "old", now + timedelta(hours=1), now) == ["new", "old"]
    assert signing_secrets("new", "old", now, now) == ["new"]
    assert signing_secrets("new", None, None, now) == ["new"]


def test_a_delivery_gives_up_when_the_next_try_falls_past_three_days():
    since = datetime(2026, 12, 1, tzinfo=UTC)
    assert not gives_up(since, since + timedelta(days=3))
    assert gives_up(since, since + timedelta(days=3, seconds=1))


def test_sealed_secrets_open_only_with_the_key_and_for_the_merchant():
    key = CardKey("k1", os.urandom(32))
    sealed = SecretBox([key]).seal("ficmart", "whsec_abc")
    assert b"whsec_abc" not in sealed and sealed.startswith(b"k1:")
    assert SecretBox([key]).open("ficmart", sealed) == "whsec_abc"
    with pytest.raises(SecretUnreadable):
        SecretBox([key]).open("other", sealed)
    with pytest.raises(SecretUnreadable):
        SecretBox([CardKey("k1", os.urandom(32))]).open("ficmart", sealed)  # same id, another key


def test_after_a_card_key_rotation_old_secrets_open_and_new_ones_use_the_newest_key():
    old, new = CardKey("2025", os.urandom(32)), CardKey("2026", os.urandom(32))
    sealed_before = SecretBox([old]).seal("ficmart", "whsec_before")
    rotated = SecretBox([new, old])
    assert rotated.open("ficmart", sealed_before) == "whsec_before"
    assert rotated.seal("ficmart", "whsec_after").startswith(b"2026:")
    with pytest.raises(SecretUnreadable):
        SecretBox([new]).open("ficmart", sealed_before)  # its key left the keyring
