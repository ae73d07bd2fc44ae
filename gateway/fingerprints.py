"""Which request an Idempotency-Key was first used for, remembered without card data.

A key's row keeps a fingerprint of its request for as long as the key (48 h), so that the
same key with another request gets 422 instead of a replay. A plain digest of the body would
keep the card: the number and CVV are in an authorize body, and with the last four digits and
the expiry beside it a SHA-256 gives the CVV back in a thousand guesses. Card rules forbid
keeping the CVV after authorization in any form, hashed included. So the fingerprint is

    "hmac1:" + HMAC-SHA256(k, method, path, canonical body)

where the canonical body is the JSON with `card.cvv` removed and `card.number` replaced by
its own HMAC under k, keys sorted. k is derived from the card key, never stored. Two requests
that differ only in their CVV are the same request (the CVV is not what a retry changes);
the same JSON written with other spacing or key order is the same request too.

Rows written before this scheme hold "legacy": their body cannot be compared any more, and
the key replays its answer for the same method and path (schema.sql migrates them).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import orjson

PREFIX = "hmac1:"
LEGACY = "legacy"
_DERIVATION = b"ficmart-gateway idempotency fingerprint v1"


class Fingerprinter:
    """Fingerprints under keys derived from the card keys, newest first: a fingerprint is
    written under the newest and recognised under any, so a key rotation does not turn a
    retry into a 422."""

    def __init__(self, card_keys: Sequence[bytes]):
        if not card_keys:
            raise ValueError("a Fingerprinter needs at least one card key")
        self._keys = [hmac.new(key, _DERIVATION, hashlib.sha256).digest() for key in card_keys]

    def of(self, method: str, path: str, body: bytes) -> tuple[str, ...]:
        """The request's fingerprint under each key, newest first."""
        return tuple(_fingerprint(key, method, path, body) for key in self._keys)


def _fingerprint(key: bytes, method: str, path: str, body: bytes) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (method.encode(), path.encode(), _canonical(key, body)):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return PREFIX + mac.hexdigest()


def _canonical(key: bytes, body: bytes) -> bytes:
    """The body as JSON without the CVV and with the number as its keyed digest. A body that
    is not JSON (only ever refused, never stored) is taken as it is, under the HMAC alone."""
    try:
        document = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        return body
    if isinstance(document, dict) and isinstance(document.get("card"), dict):
        card = dict(document["card"])
        card.pop("cvv", None)
        number = card.pop("number", None)
        if number is not None:
            card["number_hmac"] = hmac.new(key, orjson.dumps(number), hashlib.sha256).hexdigest()
        document = {**document, "card": card}
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def matches(stored: str, fingerprints: Sequence[str]) -> bool:
    """Whether a stored fingerprint is this request's (under any of its keys); a legacy row
    matches any request for its method and path, which the caller compares."""
    return stored == LEGACY or any(hmac.compare_digest(stored, mine) for mine in fingerprints)
