"""Settings from environment variables, validated once at start-up.

Every process calls `load(...)` with the names it needs; a bad or missing
value stops the process with a message naming the variable and exit code 2.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from dataclasses import dataclass, field
from urllib.parse import urlparse

DEV_API_KEYS = "ficmart:sk_test_ficmart_dev"

DEFAULTS = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/gateway",
    "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
    "BANK_URL": "http://127.0.0.1:8787",
    "GATEWAY_API_KEYS": DEV_API_KEYS,
    "LOG_LEVEL": "info",
}

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting has a value the process cannot start with."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    amqp_url: str
    bank_url: str
    api_keys: dict[str, str]  # key -> caller name
    card_key: bytes | None
    log_level: str
    # The ops console (/ops on gateway-api): key -> ops person's name. Empty: the console is off.
    ops_keys: dict[str, str] = field(default_factory=dict)


def _url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    problem = f"{name} must be a {'/'.join(schemes)} URL with a host and a valid port, got {value!r}"
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise ConfigError(problem) from None
    if parsed.scheme not in schemes or not parsed.hostname:
        raise ConfigError(problem)
    return value


def _api_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in value.split(","):
        name, sep, key = (part.strip() for part in pair.partition(":"))
        if not sep or not name or len(key) < 8 or not key.isprintable():
            raise ConfigError(
                "GATEWAY_API_KEYS must be comma-separated name:key pairs with keys of at least 8 printable characters"
            )
        if key in keys:
            raise ConfigError("GATEWAY_API_KEYS lists the same key twice")
        keys[key] = name
    return keys


# An ops name goes into history causes (`ops:<name>:replay`) and page headers: kept plain.
_OPS_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _ops_keys(value: str, api_keys: dict[str, str]) -> dict[str, str]:
    """GATEWAY_OPS_KEYS: name:key pairs like GATEWAY_API_KEYS; empty means no console."""
    keys: dict[str, str] = {}
    for pair in value.split(","):
        if not pair.strip():
            continue
        name, sep, key = (part.strip() for part in pair.partition(":"))
        if not sep or not _OPS_NAME.match(name) or len(key) < 16 or not key.isprintable():
            raise ConfigError(
                "GATEWAY_OPS_KEYS must be comma-separated name:key pairs: names of letters, digits, '.', '_' "
                "or '-', keys of at least 16 printable characters"
            )
        if key in keys:
            raise ConfigError("GATEWAY_OPS_KEYS lists the same key twice")
        if key in api_keys:
            raise ConfigError("GATEWAY_OPS_KEYS and GATEWAY_API_KEYS share a key: an ops key must never open /v1")
        keys[key] = name
    return keys


def _card_key(value: str | None, required: bool) -> bytes | None:
    if not value:
        if required:
            raise ConfigError(
                "CARD_ENCRYPTION_KEY is required: 32 random bytes, base64 "
                "(make one with: python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())')"
            )
        return None
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        raise ConfigError("CARD_ENCRYPTION_KEY is not valid base64") from None
    if len(key) != 32:
        raise ConfigError(f"CARD_ENCRYPTION_KEY must decode to 32 bytes, got {len(key)}")
    return key


def parse(env: dict[str, str], *, need_card_key: bool = False) -> Settings:
    def get(name: str) -> str:
        return env.get(name) or DEFAULTS[name]

    level = get("LOG_LEVEL").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    api_keys = _api_keys(get("GATEWAY_API_KEYS"))
    return Settings(
        database_url=_url("DATABASE_URL", get("DATABASE_URL"), ("postgresql", "postgres")),
        amqp_url=_url("AMQP_URL", get("AMQP_URL"), ("amqp", "amqps")),
        bank_url=_url("BANK_URL", get("BANK_URL"), ("http", "https")).rstrip("/"),
        api_keys=api_keys,
        card_key=_card_key(env.get("CARD_ENCRYPTION_KEY"), need_card_key),
        log_level=level,
        ops_keys=_ops_keys(env.get("GATEWAY_OPS_KEYS") or "", api_keys),
    )


def load(*, need_card_key: bool = False) -> Settings:
    """Parse os.environ, or exit 2 with a clear message."""
    try:
        return parse(dict(os.environ), need_card_key=need_card_key)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
