"""Card checks and the card vault.

The full number and CVV exist only in the authorize request and, sealed with
AES-GCM, in the vault row until the authorization has a final outcome.
"""

from __future__ import annotations

import os

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


class CardVault:
    """Seals number and CVV with AES-GCM; the payment id is bound as associated data."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, payment_id: str, number: str, cvv: str) -> bytes:
        nonce = os.urandom(12)
        plain = orjson.dumps({"number": number, "cvv": cvv})
        return nonce + self._aead.encrypt(nonce, plain, payment_id.encode())

    def open(self, payment_id: str, sealed: bytes) -> tuple[str, str]:
        try:
            plain = self._aead.decrypt(sealed[:12], sealed[12:], payment_id.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise VaultError("card data cannot be decrypted with this CARD_ENCRYPTION_KEY") from None
        card = orjson.loads(plain)
        return card["number"], card["cvv"]
