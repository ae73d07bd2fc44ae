"""The mock bank's cards: the contract's four test cards (docs/bank.md), the cards of the
accounts it can generate for load tests (MOCKBANK_EXTRA_ACCOUNTS, see ``extra_card``), and
the Luhn check and brand of a card number."""

from __future__ import annotations

from typing import Any

EXTRA_ACCOUNT_BALANCE = 10_000_000_000  # $100,000,000.00 in cents
EXTRA_CARD_PREFIX = "400000"
EXTRA_EXPIRY_YEAR = 2035

# (account_id, card_number, cvv, expiry_month, expiry_year, balance_cents, use)
TEST_ACCOUNTS: tuple[tuple[str, str, str, int, int, int, str], ...] = (
    ("acct_1", "4111111111111111", "123", 12, 2030, 1_000_000, "happy path"),
    ("acct_2", "4242424242424242", "456", 6, 2030, 50_000, "limited balance"),
    ("acct_3", "5555555555554444", "789", 9, 2030, 0, "insufficient funds"),
    ("acct_4", "5105105105105100", "321", 3, 2020, 500_000, "expired card"),
)


def _luhn_sum(number: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total


def luhn_valid(number: str) -> bool:
    return _luhn_sum(number) % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The digit that makes ``partial + digit`` pass the Luhn check."""
    return str((10 - _luhn_sum(partial + "0") % 10) % 10)


def extra_card(index: int) -> dict[str, Any]:
    """Card data of generated account ``index`` (0-based), for load generators.

    card_number = "400000" + index as 9 zero-padded digits + Luhn check digit
                  (16 digits, Visa range, never one of the four test cards)
    cvv         = str(100 + index % 900)          (3 digits)
    expiry      = (index % 12 + 1) / 2035
    balance     = 10_000_000_000 cents ($100,000,000.00)
    account_id  = "acct_x{index}"
    """
    if not 0 <= index < 1_000_000_000:
        raise ValueError("index out of range")
    partial = f"{EXTRA_CARD_PREFIX}{index:09d}"
    return {
        "account_id": f"acct_x{index}",
        "card_number": partial + luhn_check_digit(partial),
        "cvv": str(100 + index % 900),
        "expiry_month": index % 12 + 1,
        "expiry_year": EXTRA_EXPIRY_YEAR,
        "balance": EXTRA_ACCOUNT_BALANCE,
    }


def card_brand(number: str) -> str:
    """The card network of a number, by its prefix (the ledger shows it)."""
    if number.startswith("4"):
        return "visa"
    if number[:2] in {"51", "52", "53", "54", "55"} or "2221" <= number[:4] <= "2720":
        return "mastercard"
    if number[:2] in {"34", "37"}:
        return "amex"
    if number.startswith("6011") or number.startswith("65"):
        return "discover"
    return "unknown"
