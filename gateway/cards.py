"""Card checks and the card vault.

The full number and CVV exist only in the authorize request and, sealed with
AES-GCM, in the vault row until the authorization has a final outcome.

Card keys rotate: each has an id, the vault seals under the newest and opens
under the one whose id is stored beside the sealed card (CARD_ENCRYPTION_KEYS,
newest first; `gatewayctl rekey-cards` moves the cards still sealed under an
older key to the newest, after which the older key can be dropped).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def luhn_ok(number: str) -> bool:
    if not (number.isascii() and number.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def brand(number: str) -> str:
    if number.startswith("4"):
        return "visa"
    if number[:2] in {"51", "52", "53", "54", "55"} or 2221 <= int(number[:4]) <= 2720:
        return "mastercard"
    if number[:2] in {"34", "37"}:
        return "amex"
    if number.startswith("6011") or number.startswith("65"):
        return "discover"
    return "unknown"


class VaultError(Exception):
    """A sealed card cannot be opened (wrong key or tampered data)."""


# What a key id may be: it is stored beside every sealed card and shown in messages.
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
KEY_ID_RULE = "1-32 letters, digits, '.', '_' or '-'"
# The id of a key given alone (CARD_ENCRYPTION_KEY), and of the cards sealed before keys had ids.
SINGLE_KEY_ID = "default"


class CardKey(NamedTuple):
    id: str
    secret: bytes  # 32 bytes: AES-256-GCM


class SealedCard(NamedTuple):
    """A card as the vault row keeps it: AES-GCM nonce + ciphertext, and the id of its key."""

    key_id: str
    blob: bytes


class CardVault:
    """Seals number and CVV with AES-GCM under the newest key; opens under the key the sealed
    card names. The payment id is bound as associated data."""

    def __init__(self, keys: Sequence[CardKey]):
        """`keys` newest first."""
        if not keys:
            raise ValueError("a CardVault needs at least one card key")
        self.newest_key_id = keys[0].id
        self._aeads = {key.id: AESGCM(key.secret) for key in keys}

    def seal(self, payment_id: str, number: str, cvv: str) -> SealedCard:
        nonce = os.urandom(12)
        plain = orjson.dumps({"number": number, "cvv": cvv})
        return SealedCard(
            self.newest_key_id, nonce + self._aeads[self.newest_key_id].encrypt(nonce, plain, payment_id.encode())
        )

    def open(self, payment_id: str, sealed: SealedCard) -> tuple[str, str]:
        aead = self._aeads.get(sealed.key_id)
        if aead is None:
            raise VaultError(
                f"the card was sealed under card key {sealed.key_id!r}, which the configured card keys "
                "(CARD_ENCRYPTION_KEYS) do not hold"
            )
        try:
            plain = aead.decrypt(sealed.blob[:12], sealed.blob[12:], payment_id.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise VaultError(f"card data cannot be decrypted with card key {sealed.key_id!r}") from None
        card = orjson.loads(plain)
        return card["number"], card["cvv"]

    def reseal(self, payment_id: str, sealed: SealedCard) -> SealedCard:
        """The same card sealed under the newest key (VaultError when it cannot be opened)."""
        return self.seal(payment_id, *self.open(payment_id, sealed))
