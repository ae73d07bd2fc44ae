"""Webhook rules, without I/O: which URLs may be called, how a delivery is signed, when a
failed one is tried again, and how signing secrets are kept.

A webhook URL is a server-side request whose target a merchant chooses, so it is held to
what a shop's receiver needs and nothing more: https (plain http only to a loopback host,
in development mode), no credentials in it, and, outside development mode, no address
that is not public (checked here for an address written in the URL, and again by the
deliverer on every address the name resolves to, at delivery time).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.cards import CardKey

SIGNATURE_HEADER = "Gateway-Signature"
EVENT_ID_HEADER = "Gateway-Event-Id"
DELIVERY_TIMEOUT_SECONDS = 10.0  # gateway-api.md: a 2xx within 10 s is delivered
ROTATION_OVERLAP = timedelta(hours=24)  # the old secret still signs this long after a rotation
RETRY_WINDOW = timedelta(days=3)  # then a delivery is failed, for ops to resend
MAX_URL_LENGTH = 2048
SECRET_PREFIX = "whsec_"


class UrlRefused(ValueError):
    """A webhook URL the gateway will not call; the message says why."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return address


def _is_loopback(host: str) -> bool:
    address = _ip(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def address_allowed(address: str, *, development: bool) -> bool:
    """May the deliverer connect to this IP address? Only public ones, outside development mode
    (not private, loopback, link-local, shared, reserved or multicast: `is_global`)."""
    ip = _ip(address)
    return development or (ip is not None and ip.is_global and not ip.is_multicast)


def check_url(url: str, *, development: bool) -> str:
    """The URL as given, if the gateway may deliver to it; else UrlRefused saying why."""
    if len(url) > MAX_URL_LENGTH or not url.isascii() or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UrlRefused(f"a webhook URL is at most {MAX_URL_LENGTH} printable ASCII characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise UrlRefused("not a URL with a host and a valid port") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRefused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("the URL must not carry credentials (user:password@)")
    if parts.fragment:
        raise UrlRefused("the URL must not have a #fragment")
    if parts.scheme == "http":
        if not (development and _is_loopback(host)):
            raise UrlRefused("a webhook URL must be https (plain http only to a loopback host in development mode)")
    elif parts.scheme != "https":
        raise UrlRefused("a webhook URL must be https")
    if not development:
        if host == "localhost" or host.endswith(".localhost"):
            raise UrlRefused("a loopback host is refused outside development mode")
        if _ip(host) is not None and not address_allowed(host, development=False):
            raise UrlRefused(f"{host} is not a public address (private, loopback, link-local or reserved)")
    return url


# ---- signatures ---------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secrets_: Sequence[str], timestamp: int, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, one v1 per secret."""
    signed = b"%d." % timestamp + body
    macs = (hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets_)
    return f"t={timestamp}," + ",".join(f"v1={mac}" for mac in macs)


def signing_secrets(current: str, old: str | None, old_until: datetime | None, now: datetime) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the one before a
    rotation until its overlap ends."""
    return [current] + ([old] if old is not None and old_until is not None and now < old_until else [])


# ---- retries ------------------------------------------------------------------------------


def gives_up(retry_since: datetime, next_try: datetime, window: timedelta = RETRY_WINDOW) -> bool:
    """Would the next try fall outside the retry window? Then the delivery is failed now."""
    return next_try - retry_since > window


# ---- secrets at rest ----------------------------------------------------------------------


class SecretBox:
    """Seals signing secrets with AES-GCM under keys derived (HKDF) from the card keys
    (CARD_ENCRYPTION_KEYS, newest first), bound to the merchant: a reader of the database (or
    a backup) cannot sign a request, and a sealed secret copied to another merchant's row does
    not open. A secret is sealed under the newest key and names it (`<key id>:<nonce><ct>`);
    it opens while its key is in the keyring (`webhooks rotate-secret` seals under the newest)."""

    def __init__(self, keys: Sequence[CardKey]):
        if not keys:
            raise ValueError("no card key to seal webhook secrets with")
        self._newest = keys[0].id
        self._aeads = {key.id: AESGCM(_derive(key.secret)) for key in keys}

    def seal(self, merchant: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(12)
        sealed = self._aeads[self._newest].encrypt(nonce, secret.encode(), merchant.encode())
        return self._newest.encode() + b":" + nonce + sealed

    def open(self, merchant: str, sealed: bytes) -> str:
        key_id, _, blob = sealed.partition(b":")
        aead = self._aeads.get(key_id.decode("ascii", "replace"))
        if aead is None:
            raise SecretUnreadable(merchant)
        try:
            return aead.decrypt(blob[:12], blob[12:], merchant.encode()).decode()
        except (InvalidTag, ValueError):
            raise SecretUnreadable(merchant) from None


def _derive(card_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"gateway webhook secrets").derive(card_key)


class SecretUnreadable(Exception):
    """A sealed secret does not open with these card keys (its key is gone, or it was tampered with)."""
