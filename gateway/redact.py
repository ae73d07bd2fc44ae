"""Card data and passwords out of text that came from outside, and that text cut to a size.

Used wherever such text is kept, logged or published: log lines, the bank's
error messages and unknown codes, anything shown back to a client.

- A card-like number is 13-19 digits, possibly grouped by single spaces or
  dashes, whatever stands next to it (letters glued on included: a number
  must not slip through as `4111111111111111cvv123`).
- Ids, ours (`pay_` + 32 hex) and the bank's (`auth_` + uuid), are left
  whole: their hex holds a 13-digit run in about one id of 60, and a log
  line whose ids were cut no longer matches its payment.
- A CVV is 3-4 digits next to its name (cvv, cvc, csc, security code).
- A URL's password (`scheme://user:password@host`, libpq's `?password=`)
  is shown as `***`: a DSN in a configuration error or a library's message
  must not hand out the database's password.

Text kept from another party (the bank's error messages) is also made
`printable`: control and other unprintable characters are removed (NUL, which
PostgreSQL's jsonb refuses, included) BEFORE the redaction, so none can split
a card number out of its sight and join it up again later.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

_ID = (
    r"(?<![A-Za-z0-9_])[a-z]+_(?:[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?![0-9a-f])"
)
_PAN = r"\d(?:[ -]?\d){12,18}"
_CVV = r"(?i:cvv2?|cvc2?|csc|security[ _-]?code)[^A-Za-z0-9]{0,6}\d{3,4}(?!\d)"
_SECRETS = re.compile(f"(?P<id>{_ID})|{_PAN}|{_CVV}")
# A card number with separators is at most 37 characters: text cut this far past
# the limit is redacted before the final cut, so no card number is left half-shown.
_MARGIN = 64


# Up to the last '@' of the token, as a URL parser reads the user part (a raw '@' or '/' in a
# password is hidden too; a host after such a password may be hidden with it).
_URL_PASSWORD = re.compile(r"(?P<user>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):\S*@")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<name>[?&]password=)[^&#\s]*")


def hide_passwords(text: str) -> str:
    """`text` with the password of every URL in it shown as `***`."""
    if "://" not in text:
        return text
    return _QUERY_PASSWORD.sub(r"\g<name>***", _URL_PASSWORD.sub(r"\g<user>:***@", text))


def _replace(match: re.Match[str]) -> str:
    return match.group("id") or REDACTED


_DIGIT = re.compile(r"\d")


def redact(text: str) -> str:
    """`text` with card-like numbers, labelled CVVs and URL passwords replaced."""
    text = hide_passwords(text)
    if _DIGIT.search(text) is None:  # most text: nothing to find, and this is far cheaper
        return text
    return _SECRETS.sub(_replace, text)


def clean(text: str, limit: int, *, printable: bool = False) -> str:
    """Redacted and cut to `limit` characters (a marker says how much was cut); `printable`:
    unprintable characters removed first."""
    if len(text) > limit:
        text = hide_passwords(text)  # whole: a cut could leave half a password unrecognised
    head = text if len(text) <= limit else text[: limit + _MARGIN]
    if printable and not head.isprintable():
        head = "".join(c for c in head if c.isprintable())
    if len(text) <= limit:
        return redact(head)
    return f"{redact(head)[:limit]}...[{len(text) - limit} more characters]"
