"""The formats of the values the shared settings read (gateway/config/shared.py): the
addresses of the database, the broker and the bank, the callers' and operators' names and keys,
the card keys. Each function takes a variable's text and returns its value or raises
ConfigError naming the variable; a message never echoes a key, nor a URL's password.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re
from collections import Counter
from urllib.parse import parse_qs, urlparse

from gateway.cards import KEY_ID, KEY_ID_RULE, CardKey
from gateway.config.env import ConfigError
from gateway.redact import hide_passwords

# A caller's name is written into every row of its payments and names its broker exchange
# (payments.events.<name>) and account: nothing there may be ambiguous (a '.', a space,
# the \x1f that separates it from an idempotency key, letters in two cases).
MERCHANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MERCHANT_NAME_RULE = "1-64 lowercase letters, digits, '_' or '-', the first a letter or digit"
_OPS_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def shown_url(url: str) -> str:
    """`url` as messages show it: without its password (quoted, and not at all when it has no
    scheme://, where a user:password@ could not be told apart)."""
    if "://" in url:
        return repr(hide_passwords(url))
    return "a value with no scheme://" if "@" in url else repr(url)


def is_loopback(host: str) -> bool:
    """`host` is this machine (localhost or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    """`value`, a URL of one of `schemes` with a host and a valid port; else ConfigError naming `name`."""
    problem = f"{name} must be a {'/'.join(schemes)} URL with a host and a valid port, got {shown_url(value)}"
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise ConfigError(problem) from None
    if parsed.scheme not in schemes or not parsed.hostname:
        raise ConfigError(problem)
    return value


# What target_session_attrs may ask for: the gateway writes, so it connects to the primary.
_WRITABLE_SESSIONS = ("read-write", "primary")


def database_url(value: str) -> str:
    """DATABASE_URL: one host, or a libpq multi-host URI (host1:port1,host2:port2) that names
    how the primary is found (target_session_attrs=read-write or primary): without it, a
    process could land on a standby and fail every write."""
    problem = (
        "DATABASE_URL must be a postgresql URL with a host (or comma-separated host:port pairs) "
        f"and valid ports, got {shown_url(value)}"
    )
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ConfigError(problem)
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    hosts = authority.rpartition("@")[2].split(",")
    for host in hosts:
        try:
            parsed = urlparse(f"{scheme}://{host}")
            parsed.port  # noqa: B018 - raises ValueError on a port out of range or not a number
        except ValueError:
            raise ConfigError(problem) from None
        if not parsed.hostname:
            raise ConfigError(problem)
    attrs = parse_qs(urlparse(f"{scheme}://x/{rest.partition('/')[2]}").query).get("target_session_attrs", [])
    if attrs and (len(attrs) > 1 or attrs[0] not in _WRITABLE_SESSIONS):
        raise ConfigError(
            f"DATABASE_URL: target_session_attrs must be one of {', '.join(_WRITABLE_SESSIONS)} "
            f"(the gateway writes), got {shown_url(value)}"
        )
    if len(hosts) > 1 and not attrs:
        raise ConfigError(
            f"DATABASE_URL names {len(hosts)} hosts: add ?target_session_attrs=read-write so every "
            f"process finds the primary, got {shown_url(value)}"
        )
    return value


def amqp_url(value: str) -> str:
    """AMQP_URL: one broker URL, or several (the nodes of a cluster) separated by commas."""
    nodes = value.split(",")
    for number, node in enumerate(nodes, 1):
        name = "AMQP_URL" if len(nodes) == 1 else f"AMQP_URL (node {number} of {len(nodes)})"
        checked_url(name, node.strip(), ("amqp", "amqps"))
    return value


def api_keys(value: str) -> dict[str, str]:
    """GATEWAY_API_KEYS: key -> caller name."""
    keys: dict[str, str] = {}
    for pair in value.split(","):
        name, sep, key = (part.strip() for part in pair.partition(":"))
        if not sep or not name or len(key) < 8 or not key.isprintable():
            raise ConfigError(
                "GATEWAY_API_KEYS must be comma-separated name:key pairs with keys of at least 8 printable characters"
            )
        if not MERCHANT_NAME.fullmatch(name):  # not echoed: a pair written backwards would show its key
            raise ConfigError(f"GATEWAY_API_KEYS: the name of pair {len(keys) + 1} must be {MERCHANT_NAME_RULE}")
        if key in keys:
            raise ConfigError("GATEWAY_API_KEYS lists the same key twice")
        keys[key] = name
    return keys


def post_rates(value: str) -> dict[str, float]:
    """GATEWAY_POST_RATES: caller name -> POSTs per second."""
    rates: dict[str, float] = {}
    for pair in value.split(","):
        name, sep, rate = (part.strip() for part in pair.partition(":"))
        try:
            number = float(rate)
        except ValueError:
            number = math.nan
        if not sep or not MERCHANT_NAME.fullmatch(name) or not 0 < number < math.inf:
            raise ConfigError(
                f"GATEWAY_POST_RATES must be comma-separated name:rate pairs, rates above 0, got {pair.strip()!r}"
            )
        rates[name] = number
    return rates


def ops_keys(value: str) -> dict[str, str]:
    """GATEWAY_OPS_KEYS: key -> operator name."""
    keys: dict[str, str] = {}
    for pair in value.split(","):
        if not pair.strip():
            continue
        name, sep, key = (part.strip() for part in pair.partition(":"))
        if not sep or ops_name_problem(name) or len(key) < 16 or not key.isprintable():
            raise ConfigError(
                "GATEWAY_OPS_KEYS must be comma-separated name:key pairs: names of letters, digits, '.', '_' "
                "or '-' (they are written into payment histories), keys of at least 16 printable characters"
            )
        if key in keys:
            raise ConfigError("GATEWAY_OPS_KEYS lists the same key twice")
        keys[key] = name
    return keys


def ops_name_problem(name: str) -> str | None:
    """Why `name` cannot name an operator (None: it can)."""
    if _OPS_NAME.fullmatch(name):
        return None
    return "an ops name is 1-64 letters, digits, '.', '_' or '-' (it is written into payment histories)"


def ops_key_bits(key: str) -> float:
    """An estimate of the randomness of `key`: its length times the Shannon entropy of its
    characters' frequencies. It cannot tell a random key from a long typed one, but a key too
    short, too plain or too repetitive to hold 128 random bits scores under 128; a random key
    needs some margin (a 32-character hex key of 128 bits scores about 115), so keys are made
    of 32 random bytes (`gatewayctl ops-key`)."""
    if not key:
        return 0.0
    counts = Counter(key)
    entropy = -sum(n / len(key) * math.log2(n / len(key)) for n in counts.values())
    return len(key) * entropy


def card_keys(value: str) -> tuple[CardKey, ...]:
    """CARD_ENCRYPTION_KEYS: the keys, newest first."""
    keys: list[CardKey] = []
    for number, pair in enumerate(value.split(","), 1):
        key_id, sep, secret = (part.strip() for part in pair.partition(":"))
        where = f"CARD_ENCRYPTION_KEYS (pair {number})"  # ids not echoed: a pair written backwards shows its key
        if not sep or not KEY_ID.fullmatch(key_id):
            raise ConfigError(f"{where} must be id:key, the id {KEY_ID_RULE}")
        keys.append(CardKey(key_id, card_secret(where, secret)))
    if len({key.id for key in keys}) < len(keys):
        raise ConfigError("CARD_ENCRYPTION_KEYS names the same key id twice")
    if len({key.secret for key in keys}) < len(keys):
        raise ConfigError("CARD_ENCRYPTION_KEYS lists the same key twice")
    return tuple(keys)


def card_secret(where: str, value: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        raise ConfigError(f"{where} is not valid base64") from None
    if len(key) != 32:
        raise ConfigError(f"{where} must decode to 32 bytes, got {len(key)}")
    return key
