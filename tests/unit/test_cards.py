"""gateway.cards: Luhn, brand detection and the AES-GCM card vault."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import cards
from gateway.cards import CardKey, CardVault, SealedCard, VaultError

# The four test accounts of docs/bank.md.
CONTRACT_CARDS = {
    "4111111111111111": "visa",
    "4242424242424242": "visa",
    "5555555555554444": "mastercard",
    "5105105105105100": "mastercard",
}


def reference_luhn(number: str) -> bool:
    """Independent Luhn: double every second digit from the right, sum the digits."""
    digits = [int(c) for c in number]
    checksum = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            doubled = digit * 2
            checksum += doubled // 10 + doubled % 10
        else:
            checksum += digit
    return checksum % 10 == 0


def check_digit(payload: str) -> str:
    for d in "0123456789":
        if reference_luhn(payload + d):
            return d
    raise AssertionError("no check digit")


# ------------------------------------------------------------------- Luhn
@pytest.mark.parametrize("number", sorted(CONTRACT_CARDS))
def test_luhn_accepts_contract_test_cards(number):
    assert cards.luhn_ok(number) is True


@pytest.mark.parametrize(
    "number",
    [
        "378282246310005",  # amex
        "371449635398431",  # amex
        "6011111111111117",  # discover
        "6011000990139424",  # discover
        "2223003122003222",  # mastercard 2-series
        "4012888888881881",  # visa
        "4000056655665556",  # visa debit
        "30569309025904",  # diners, 14 digits
        "3530111333300000",  # jcb
        "4222222222222",  # 13-digit visa
        "6200000000000005",  # unionpay
        "0000000000000000",
    ],
)
def test_luhn_accepts_other_known_valid_numbers(number):
    assert cards.luhn_ok(number) is True


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111112",  # last digit off by one
        "4111111111111110",
        "4242424242424241",
        "5555555555554445",
        "5105105105105101",
        "1234567812345678",
        "4111111111111121",  # adjacent transposition 12 -> 21 at the end
        "1111111111111111",
        "4111111111111",
        "79927398710",  # the classic Luhn example with a wrong check digit
        "79927398711",
        "79927398712",
        "79927398714",
        "79927398719",
    ],
)
def test_luhn_rejects_known_invalid_numbers(number):
    assert cards.luhn_ok(number) is False


def test_luhn_classic_example():
    assert cards.luhn_ok("79927398713") is True


@pytest.mark.parametrize(
    "number",
    [
        "",
        " ",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        " 4111111111111111",
        "4111111111111111 ",
        "4111111111111111\n",
        "-4111111111111111",
        "+4111111111111111",
        "4111111111111111.0",
        "411111111111111a",
        "abcdefghijklmnop",
        "0x4111111111111111",
        "4111111111111111\x00",
    ],
    ids=repr,
)
def test_luhn_rejects_non_digits(number):
    assert cards.luhn_ok(number) is False


@pytest.mark.parametrize(
    "number",
    [
        "４１１１１１１１１１１１１１１１",  # fullwidth digits of 4111111111111111
        "٤١١١١١١١١١١١١١١١",  # arabic-indic digits of 4111111111111111
        "४१११११११११११११११",  # devanagari digits of 4111111111111111
        "4111111111111111²",  # superscript two: str.isdigit() is True, int() fails
        "²",
        "①",
    ],
    ids=["fullwidth", "arabic-indic", "devanagari", "superscript-suffix", "superscript", "circled"],
)
def test_luhn_rejects_non_ascii_digits(number):
    # A card number is ASCII digits (docs/bank.md: 13-19 digits). Other
    # Unicode digits must be judged invalid, never accepted and never crash.
    assert cards.luhn_ok(number) is False


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_luhn_matches_reference(number):
    assert cards.luhn_ok(number) is reference_luhn(number)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789", min_size=12, max_size=18), st.data())
def test_luhn_detects_every_single_digit_error(payload, data):
    number = payload + check_digit(payload)
    assert cards.luhn_ok(number)
    i = data.draw(st.integers(0, len(number) - 1), label="position")
    wrong = data.draw(st.sampled_from([d for d in "0123456789" if d != number[i]]), label="digit")
    assert not cards.luhn_ok(number[:i] + wrong + number[i + 1 :])


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=25).filter(lambda s: not (s.isascii() and s.isdigit())))
def test_luhn_never_accepts_anything_but_ascii_digits(text):
    assert cards.luhn_ok(text) is False


# ------------------------------------------------------------------ brand
@pytest.mark.parametrize(("number", "expected"), sorted(CONTRACT_CARDS.items()))
def test_brand_of_contract_test_cards(number, expected):
    assert cards.brand(number) == expected


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("4012888888881881", "visa"),
        ("4222222222222", "visa"),
        ("5100000000000008", "mastercard"),
        ("5200828282828210", "mastercard"),
        ("5300000000000006", "mastercard"),
        ("5400000000000005", "mastercard"),
        ("5555555555554444", "mastercard"),
        ("2221000000000009", "mastercard"),  # first of the 2-series range
        ("2223003122003222", "mastercard"),
        ("2720990000000007", "mastercard"),  # last of the 2-series range
        ("2220990000000008", "unknown"),  # just below
        ("2721000000000002", "unknown"),  # just above
        ("5000000000000009", "unknown"),  # 50 is not mastercard
        ("5600000000000003", "unknown"),  # 56 is not mastercard
        ("378282246310005", "amex"),
        ("371449635398431", "amex"),
        ("340000000000009", "amex"),
        ("6011111111111117", "discover"),
        ("6011000990139424", "discover"),
        ("6500000000000002", "discover"),
        ("3530111333300000", "unknown"),  # jcb
        ("30569309025904", "unknown"),  # diners
        ("6200000000000005", "unknown"),  # unionpay
        ("1234567812345670", "unknown"),
    ],
)
def test_brand(number, expected):
    assert cards.brand(number) == expected


# ------------------------------------------------------------------ vault
@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def vault(key) -> CardVault:
    return CardVault([CardKey("k1", key)])


@pytest.mark.parametrize(("number", "cvv"), list(zip(CONTRACT_CARDS, ["123", "456", "789", "321"], strict=True)))
def test_vault_round_trip(vault, number, cvv):
    sealed = vault.seal("pay_1", number, cvv)
    assert sealed.key_id == "k1" and isinstance(sealed.blob, bytes)
    assert vault.open("pay_1", sealed) == (number, cvv)


def test_vault_round_trip_with_a_new_vault_on_the_same_key(key):
    sealed = CardVault([CardKey("k1", key)]).seal("pay_abc", "4111111111111111", "1234")
    assert CardVault([CardKey("k1", key)]).open("pay_abc", sealed) == ("4111111111111111", "1234")


@settings(max_examples=100, deadline=None)
@given(
    payment_id=st.text(min_size=0, max_size=60),
    number=st.text(alphabet="0123456789", min_size=13, max_size=19),
    cvv=st.text(alphabet="0123456789", min_size=3, max_size=4),
)
def test_vault_round_trip_property(payment_id, number, cvv):
    vault = CardVault([CardKey("k1", b"\x01" * 32)])
    assert vault.open(payment_id, vault.seal(payment_id, number, cvv)) == (number, cvv)


def test_ciphertext_contains_neither_number_nor_cvv(vault):
    number, cvv = "4111111111111111", "9876"
    for _ in range(50):
        sealed = vault.seal("pay_1", number, cvv).blob
        for needle in (number, number[-4:] * 2, number[:6] + number[-4:]):
            assert needle.encode() not in sealed
            assert needle.encode("utf-16-le") not in sealed
        assert b'"number"' not in sealed and b'"cvv"' not in sealed
        assert number not in sealed.hex() and number not in repr(sealed)


def test_each_seal_uses_a_fresh_nonce(vault):
    sealed = {vault.seal("pay_1", "4111111111111111", "123").blob for _ in range(100)}
    assert len(sealed) == 100
    assert len({s[:12] for s in sealed}) == 100


def test_wrong_key_raises_vault_error(vault):
    sealed = vault.seal("pay_1", "4111111111111111", "123")
    other = CardVault([CardKey("k1", os.urandom(32))])  # same id, another key
    with pytest.raises(VaultError):
        other.open("pay_1", sealed)


def test_wrong_payment_id_raises_vault_error(vault):
    # The payment id is bound as associated data: a sealed card moved to
    # another payment's row cannot be opened there.
    sealed = vault.seal("pay_1", "4111111111111111", "123")
    for other_id in ("pay_2", "pay_1 ", "PAY_1", "", "pay_", "pay_11"):
        with pytest.raises(VaultError):
            vault.open(other_id, sealed)


def test_swapped_rows_raise_vault_error(vault):
    a = vault.seal("pay_a", "4111111111111111", "123")
    b = vault.seal("pay_b", "4242424242424242", "456")
    with pytest.raises(VaultError):
        vault.open("pay_a", b)
    with pytest.raises(VaultError):
        vault.open("pay_b", a)


def test_every_flipped_bit_raises_vault_error(vault):
    sealed = vault.seal("pay_1", "4111111111111111", "123").blob
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[i] ^= bit
            with pytest.raises(VaultError):
                vault.open("pay_1", SealedCard("k1", bytes(tampered)))


def test_appended_bytes_raise_vault_error(vault):
    sealed = vault.seal("pay_1", "4111111111111111", "123").blob
    for extra in (b"\x00", b"x" * 16):
        with pytest.raises(VaultError):
            vault.open("pay_1", SealedCard("k1", sealed + extra))


def test_every_truncation_raises_vault_error(vault):
    # A truncated row is tampered data: it must be a VaultError, whatever its length.
    sealed = vault.seal("pay_1", "4111111111111111", "123").blob
    failures = []
    for n in range(len(sealed)):
        try:
            vault.open("pay_1", SealedCard("k1", sealed[:n]))
        except VaultError:
            continue
        except Exception as exc:  # noqa: BLE001 - collected to report all lengths at once
            failures.append((n, type(exc).__name__))
        else:
            failures.append((n, "no error"))
    assert failures == []


def test_vault_error_does_not_carry_the_card(vault):
    sealed = vault.seal("pay_1", "4111111111111111", "123")
    with pytest.raises(VaultError) as info:
        CardVault([CardKey("k1", os.urandom(32))]).open("pay_1", sealed)
    assert "4111111111111111" not in str(info.value)
    assert "4111111111111111" not in repr(info.value)


# ------------------------------------------------------------------ key rotation
def test_the_newest_key_seals_and_every_key_opens_what_it_sealed():
    old, new = CardKey("old", os.urandom(32)), CardKey("new", os.urandom(32))
    sealed_before = CardVault([old]).seal("pay_1", "4111111111111111", "123")
    rotated = CardVault([new, old])
    sealed_after = rotated.seal("pay_2", "4242424242424242", "456")
    assert (sealed_before.key_id, sealed_after.key_id) == ("old", "new")
    assert rotated.open("pay_1", sealed_before) == ("4111111111111111", "123")
    assert rotated.open("pay_2", sealed_after) == ("4242424242424242", "456")
    # the id says which key: the new key is not tried on a card the old one sealed
    with pytest.raises(VaultError):
        rotated.open("pay_1", SealedCard("new", sealed_before.blob))


def test_reseal_moves_a_card_to_the_newest_key():
    old, new = CardKey("old", os.urandom(32)), CardKey("new", os.urandom(32))
    sealed = CardVault([old]).seal("pay_1", "4111111111111111", "123")
    moved = CardVault([new, old]).reseal("pay_1", sealed)
    assert moved.key_id == "new"
    assert CardVault([new]).open("pay_1", moved) == ("4111111111111111", "123")


def test_a_card_under_a_key_no_longer_configured_names_the_key_not_the_card():
    sealed = CardVault([CardKey("old", os.urandom(32))]).seal("pay_1", "4111111111111111", "123")
    with pytest.raises(VaultError, match="'old'.*CARD_ENCRYPTION_KEYS") as info:
        CardVault([CardKey("new", os.urandom(32))]).open("pay_1", sealed)
    assert "4111111111111111" not in str(info.value)


def test_a_vault_needs_a_key():
    with pytest.raises(ValueError):
        CardVault([])
