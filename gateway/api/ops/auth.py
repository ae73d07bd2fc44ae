"""Who may use the console, and which POSTs are really theirs.

Login: HTTP Basic, the operator's name in GATEWAY_OPS_KEYS as the user name
and their key as the password; the name is what the history records. Failed
logins are counted and slowed per source and per name (throttle.py).
FicMart's API keys are a different set (the configuration refuses a key in
both), and /v1 only reads Bearer keys.

A browser sends Basic credentials with every request to the site, a form
POST from another site included. So every action also needs:
- a form token: HMAC-SHA256 keyed by the operator's own ops key over
  (action, target, issue time), valid for TOKEN_SECONDS. Any API process
  holding the same GATEWAY_OPS_KEYS verifies it; a page of another site
  cannot read ours to copy one;
- a same-origin request: its Origin (or, without one, its Referer) names
  the host the request was sent to. The pages send `Referrer-Policy:
  same-origin`, so our own forms always carry one of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.api.middleware import key_digest

TOKEN_SECONDS = 15 * 60
_CLOCK_SKEW = 60  # API processes on different hosts may disagree by this much
_TOKEN_CONTEXT = b"gateway-ops-form\x1f"


@dataclass(frozen=True)
class Operator:
    name: str
    key: str


def operators_by_digest(ops_keys: dict[str, str]) -> dict[bytes, Operator]:
    """Keys looked up by their sha256, as the API's own: the lookup takes the same time whatever the guess."""
    return {key_digest(key): Operator(name, key) for key, name in ops_keys.items()}


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user name, password) of an `Authorization: Basic` header; None when there are none to read."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and password else None


def authenticate(credentials: tuple[str, str], operators: dict[bytes, Operator]) -> Operator | None:
    """The operator whose key is the password, if the user name is theirs."""
    user, password = credentials
    operator = operators.get(key_digest(password))
    if operator is None or not hmac.compare_digest(operator.name.encode(), user.encode("utf-8", "surrogateescape")):
        return None
    return operator


# ---- form tokens ----------------------------------------------------------------------------


def _mac(operator: Operator, action: str, target: str, issued: int) -> str:
    message = _TOKEN_CONTEXT + "\x1f".join((action, target, str(issued))).encode()
    return hmac.new(operator.key.encode(), message, hashlib.sha256).hexdigest()


def form_token(operator: Operator, action: str, target: str, *, at: float | None = None) -> str:
    """A token for one form: this operator, this action on this target, for TOKEN_SECONDS."""
    issued = int(time.time() if at is None else at)
    return f"{issued}.{_mac(operator, action, target, issued)}"


def token_problem(operator: Operator, action: str, target: str, token: str, *, at: float | None = None) -> str | None:
    """Why `token` does not allow this action (None: it does)."""
    issued_text, _, mac = token.partition(".")
    if not (issued_text.isascii() and issued_text.isdigit()) or not mac:
        return "the form token is missing or malformed"
    issued = int(issued_text)
    current = time.time() if at is None else at
    if not hmac.compare_digest(mac, _mac(operator, action, target, issued)):
        return "the form token is not valid for this action"
    if not current - TOKEN_SECONDS <= issued <= current + _CLOCK_SKEW:
        return f"the form has expired (forms are valid for {TOKEN_SECONDS // 60} minutes): reload the page"
    return None


# ---- same origin ------------------------------------------------------------------------------


def origin_problem(origin: str | None, referer: str | None, host: str | None) -> str | None:
    """Why the request may come from another site (None: it names our own host).

    `host` is the Host header the request was sent with. Only host and port
    are compared, not the scheme: behind a TLS-terminating proxy the request
    arrives as http while the browser's Origin says https."""
    if not host:
        return "the request has no Host header"
    source = origin if origin is not None else referer
    if not source:
        return "the request has neither an Origin nor a Referer header"
    try:
        netloc = urlsplit(source).netloc
    except ValueError:
        netloc = ""
    if source == "null" or netloc.lower() != host.lower():
        return "the request comes from another origin"
    return None
