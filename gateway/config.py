"""Settings from environment variables, validated once at start-up (pydantic-settings).

Every process has one settings class derived from `EnvSettings`: each field
names its variable (`validation_alias`), its default and what it means
(`description`, from which the --help epilogs are written). An empty
variable counts as unset. `Cls.load()` reads os.environ and, on a bad value,
prints "configuration error: ..." naming the variable and exits with code 2;
`Cls.parse(env)` does the same validation on a given mapping and raises
ConfigError.

This module also holds the settings every gateway process shares.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.cards import KEY_ID, KEY_ID_RULE, SINGLE_KEY_ID, CardKey
from gateway.redact import hide_passwords

T = TypeVar("T")

DEV_API_KEYS = "ficmart:sk_test_ficmart_dev"
# Keys with this prefix are development keys (the documented one, the tests' ones): they open
# /v1 only in development mode.
DEV_API_KEY_PREFIX = "sk_test_"
# Card keys that were ever published in this repository (compose.yaml's old default, the tests'
# key): a production process refuses them, since anyone who read the repository holds them.
PUBLISHED_CARD_KEYS = frozenset(
    {
        base64.b64decode("ZGV2LW9ubHktY2FyZC1rZXktTk9ULUZPUi1QUk9EISE="),
        b"k" * 32,
    }
)
ENVIRONMENTS = ("production", "development")
LOG_LEVELS = ("debug", "info", "warning", "error")
_OPS_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Outside development an ops key must hold this much randomness by ops_key_bits' estimate
# (`gatewayctl ops-key` makes keys of 256 bits).
OPS_KEY_MIN_BITS = 128
# A caller's name is written into every row of its payments and names its broker exchange
# (payments.events.<name>) and account: nothing there may be ambiguous (a '.', a space,
# the \x1f that separates it from an idempotency key, letters in two cases).
MERCHANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MERCHANT_NAME_RULE = "1-64 lowercase letters, digits, '_' or '-', the first a letter or digit"


class ConfigError(ValueError):
    """A setting has a value the process cannot start with."""


# The environment `EnvSettings.parse` reads instead of os.environ (None: os.environ).
_GIVEN_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("given_environment", default=None)


class _Variables(EnvSettingsSource):
    """os.environ (or the mapping given to `parse`), read the way our variables are written:
    each one under its documented name only (not also under the Python field name) and as
    the plain string it is; the field's own validator parses its format (no JSON decoding of
    lists or maps)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        given = _GIVEN_ENVIRONMENT.get()
        return super()._load_env_vars() if given is None else {name: value for name, value in given.items() if value}

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        return value

    def __call__(self) -> dict[str, Any]:
        names = set(_variable_names(self.settings_cls))
        return {name: value for name, value in super().__call__().items() if name in names}


class EnvSettings(BaseSettings):
    """Base of every process's settings; fields are also settable by name in code (tests)."""

    model_config = SettingsConfigDict(
        frozen=True, case_sensitive=True, env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _Variables(settings_cls))

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> Self:
        """The settings in `env` alone (os.environ is not read); ConfigError names the variable."""
        token = _GIVEN_ENVIRONMENT.set(env)
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc)) from None
        finally:
            _GIVEN_ENVIRONMENT.reset(token)

    @classmethod
    def from_environment(cls) -> Self:
        """The settings in os.environ; ConfigError names the variable."""
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc)) from None

    @classmethod
    def load(cls) -> Self:
        """The settings in os.environ, or exit 2 with a message naming the variable."""
        return exit_on_error(cls.from_environment)

    @classmethod
    def variables(cls) -> list[tuple[str, str, str]]:
        """(variable, default as written in the environment, meaning) for every field."""
        out = []
        for field in cls.model_fields.values():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, tuple):
                shown = ",".join(map(str, default)) or "none"
            else:
                shown = "none" if default is None else _g(default)
            out.append((str(field.validation_alias), shown, field.description or ""))
        return out


def _variable_names(cls: type[BaseSettings]) -> list[str]:
    return [str(field.validation_alias) for field in cls.model_fields.values()]


def _g(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# pydantic's error types -> what the value must be, in our own words.
_MUST_BE: dict[str, Callable[[dict[str, Any]], str]] = {
    "int_parsing": lambda _: "an integer",
    "int_type": lambda _: "an integer",
    "int_from_float": lambda _: "an integer",
    "float_parsing": lambda _: "a number",
    "float_type": lambda _: "a number",
    "finite_number": lambda _: "a finite number",
    "greater_than_equal": lambda ctx: f">= {_g(ctx['ge'])}",
    "greater_than": lambda ctx: f"> {_g(ctx['gt'])}",
    "less_than_equal": lambda ctx: f"<= {_g(ctx['le'])}",
    "less_than": lambda ctx: f"< {_g(ctx['lt'])}",
}


def _describe(cls: type[BaseSettings], exc: ValidationError) -> str:
    """Every problem, each naming its variable, "; "-separated. Our own validators write their
    message in full (and decide whether the value may be shown: keys are never echoed)."""
    aliases = {name: str(field.validation_alias) for name, field in cls.model_fields.items()}
    problems = []
    for error in exc.errors():
        ctx = error.get("ctx") or {}
        if isinstance(ctx.get("error"), Exception):
            problems.append(str(ctx["error"]))
            continue
        loc = error["loc"]
        name = aliases.get(str(loc[0]), str(loc[0])) if loc else cls.__name__
        must = _MUST_BE.get(error["type"])
        what = f"must be {must(ctx)}" if must else error["msg"].lower()
        problems.append(f"{name} {what}, got {error['input']!r}")
    return "; ".join(problems)


def exit_on_error(parse: Callable[[], T]) -> T:
    """parse(), or exit 2 with "configuration error: ..." on stderr (no traceback)."""
    try:
        return parse()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def epilog(*models: type[EnvSettings], unused: tuple[str, ...] = ()) -> str:
    """The --help text for the variables of `models` (but not those `unused` by the process)."""
    rows = [
        f"{name} ({default}): {what}"
        for model in models
        for name, default, what in model.variables()
        if name not in unused
    ]
    return "Environment: " + "; ".join(rows) + "."


def one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    """A case-insensitive choice, returned in lower case."""
    level = value.lower()
    if level not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {level!r}")
    return level


def nice_field(alias: str, description: str) -> Any:
    """A process's CPU priority for process.give_way: 0-19, 10 unless set, 0 = as started."""
    return Field(default=10, ge=0, le=19, validation_alias=alias, description=description)


# ---- the gateway's shared settings -------------------------------------------------------


def shown_url(url: str) -> str:
    """`url` as messages show it: without its password (quoted, and not at all when it has no
    scheme://, where a user:password@ could not be told apart)."""
    if "://" in url:
        return repr(hide_passwords(url))
    return "a value with no scheme://" if "@" in url else repr(url)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(name: str, value: str, schemes: tuple[str, ...]) -> str:
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


def _database_url_hosts(value: str) -> str:
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


def _amqp_urls(value: str) -> str:
    """AMQP_URL: one broker URL, or several (the nodes of a cluster) separated by commas."""
    nodes = value.split(",")
    for number, node in enumerate(nodes, 1):
        name = "AMQP_URL" if len(nodes) == 1 else f"AMQP_URL (node {number} of {len(nodes)})"
        _url(name, node.strip(), ("amqp", "amqps"))
    return value


@dataclass(frozen=True)
class DbTimeouts:
    """How long a pooled connection's work may take (seconds): waiting for a connection
    (acquire), for an answer (command, asyncpg's own clock), for a statement and a row lock
    on the server, and a transaction left idle. The server's statement_timeout comes before
    the client's command_timeout, so the server cancels the statement and rolls back."""

    acquire: float = 10.0
    command: float = 35.0
    statement: float = 30.0
    lock: float = 3.0
    idle_in_transaction: float = 60.0


DEFAULT_DB_TIMEOUTS = DbTimeouts()


def _db_seconds(default: float, alias: str, description: str) -> Any:
    return Field(default=default, gt=0, allow_inf_nan=False, validation_alias=alias, description=description)


class DatabaseTimeouts(EnvSettings):
    """DB_*_TIMEOUT_SECONDS: the bounds every gateway process puts on its PostgreSQL pool."""

    db_acquire_timeout: float = _db_seconds(
        DbTimeouts.acquire, "DB_ACQUIRE_TIMEOUT_SECONDS", "longest wait for a connection of the pool"
    )
    db_command_timeout: float = _db_seconds(
        DbTimeouts.command,
        "DB_COMMAND_TIMEOUT_SECONDS",
        "longest wait for the database's answer to one command (above DB_STATEMENT_TIMEOUT_SECONDS)",
    )
    db_statement_timeout: float = _db_seconds(
        DbTimeouts.statement, "DB_STATEMENT_TIMEOUT_SECONDS", "the server cancels a statement running longer"
    )
    db_lock_timeout: float = _db_seconds(
        DbTimeouts.lock,
        "DB_LOCK_TIMEOUT_SECONDS",
        "the server gives up waiting for a row or table lock after this long (the request gets 503, "
        "the worker retries); below DB_STATEMENT_TIMEOUT_SECONDS",
    )
    db_idle_in_transaction_timeout: float = _db_seconds(
        DbTimeouts.idle_in_transaction,
        "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS",
        "the server ends a session whose transaction stays idle this long (its locks are released); keep it "
        "above 30 s, the relay's wait for the broker's confirms inside its transaction",
    )

    @model_validator(mode="after")
    def _timeouts_in_order(self) -> Self:
        if not self.db_lock_timeout < self.db_statement_timeout < self.db_command_timeout:
            raise ConfigError(
                "DB_LOCK_TIMEOUT_SECONDS < DB_STATEMENT_TIMEOUT_SECONDS < DB_COMMAND_TIMEOUT_SECONDS must hold "
                "(the server cancels before the client gives up), got "
                f"{_g(self.db_lock_timeout)}, {_g(self.db_statement_timeout)}, {_g(self.db_command_timeout)}"
            )
        return self

    @property
    def db_timeouts(self) -> DbTimeouts:
        return DbTimeouts(
            acquire=self.db_acquire_timeout,
            command=self.db_command_timeout,
            statement=self.db_statement_timeout,
            lock=self.db_lock_timeout,
            idle_in_transaction=self.db_idle_in_transaction_timeout,
        )


class Settings(DatabaseTimeouts):
    """GATEWAY_ENV, DATABASE_URL, AMQP_URL, BANK_URL, GATEWAY_API_KEYS, CARD_ENCRYPTION_KEY(S), LOG_LEVEL,
    the database timeouts."""

    environment: str = Field(
        default="production",
        validation_alias="GATEWAY_ENV",
        description="production or development; only development accepts the published development keys "
        "(sk_test_ API keys, the documented card keys) and runs without GATEWAY_API_KEYS",
    )
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/gateway",
        validation_alias="DATABASE_URL",
        description="PostgreSQL URL; for a failover formation a libpq multi-host URI "
        "(postgresql://user@db1:5432,db2:5432/gateway?target_session_attrs=read-write)",
    )
    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        validation_alias="AMQP_URL",
        description="RabbitMQ URL (a vhost may be part of it); for a cluster, one URL per node, comma-separated",
    )
    bank_url: str = Field(
        default="http://127.0.0.1:8787", validation_alias="BANK_URL", description="base URL of the bank"
    )
    # key -> caller name
    api_keys: dict[str, str] = Field(
        default=DEV_API_KEYS,  # written as in the environment; parsed by _api_keys
        validate_default=True,
        validation_alias="GATEWAY_API_KEYS",
        description="comma-separated name:key pairs; name is the caller "
        f"({MERCHANT_NAME_RULE}; required unless GATEWAY_ENV=development, "
        "where the documented development key is the default)",
    )
    card_key: bytes | None = Field(
        default=None,
        validation_alias="CARD_ENCRYPTION_KEY",
        description="32 random bytes, base64 (required by gateway-api, gateway-worker and, in production, "
        f"gateway-relay, unless CARD_ENCRYPTION_KEYS is set); the same as CARD_ENCRYPTION_KEYS={SINGLE_KEY_ID}:<key>",
    )
    card_keys: tuple[CardKey, ...] = Field(
        default=(),
        validation_alias="CARD_ENCRYPTION_KEYS",
        description="comma-separated id:key pairs, newest first, for rotating card keys: the newest seals new "
        f"cards, every one opens the cards sealed under it (ids: {KEY_ID_RULE}; keys as CARD_ENCRYPTION_KEY)",
    )
    log_level: str = Field(default="info", validation_alias="LOG_LEVEL", description=", ".join(LOG_LEVELS))
    # key -> operator name; empty: no ops console
    ops_keys: dict[str, str] = Field(
        default_factory=dict,
        validation_alias="GATEWAY_OPS_KEYS",
        description="comma-separated name:key pairs for the /ops console (HTTP Basic, key as password); unset: off",
    )

    # caller name -> POSTs per second it may send to each API process (gateway-api --post-rate otherwise)
    post_rates: dict[str, float] = Field(
        default_factory=dict,
        validation_alias="GATEWAY_POST_RATES",
        description="comma-separated name:rate pairs: POSTs per second a caller of GATEWAY_API_KEYS may send "
        "to each API process before 429, where it differs from gateway-api --post-rate",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return _database_url_hosts(value)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        return _amqp_urls(value)

    @field_validator("bank_url")
    @classmethod
    def _bank_url(cls, value: str) -> str:
        return _url("BANK_URL", value, ("http", "https")).rstrip("/")

    @model_validator(mode="after")
    def _bank_url_is_private(self) -> Self:
        """Card numbers and CVVs travel in the bank's requests: in clear only within this
        machine, or anywhere in development mode (compose's mock bank)."""
        parsed = urlparse(self.bank_url)
        if parsed.scheme != "https" and not self.development and not _is_loopback(parsed.hostname or ""):
            raise ConfigError(
                "BANK_URL must be https (card numbers and CVVs travel to the bank) unless its host is a "
                f"loopback address or GATEWAY_ENV=development, got {shown_url(self.bank_url)}"
            )
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for pair in value.split(","):
            name, sep, key = (part.strip() for part in pair.partition(":"))
            if not sep or not name or len(key) < 8 or not key.isprintable():
                raise ConfigError(
                    "GATEWAY_API_KEYS must be comma-separated name:key pairs with keys of at least "
                    "8 printable characters"
                )
            if not MERCHANT_NAME.fullmatch(name):  # not echoed: a pair written backwards would show its key
                raise ConfigError(f"GATEWAY_API_KEYS: the name of pair {len(keys) + 1} must be {MERCHANT_NAME_RULE}")
            if key in keys:
                raise ConfigError("GATEWAY_API_KEYS lists the same key twice")
            keys[key] = name
        return keys

    @field_validator("post_rates", mode="before")
    @classmethod
    def _post_rates(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
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

    @model_validator(mode="after")
    def _post_rates_name_callers(self) -> Self:
        unknown = sorted(set(self.post_rates) - set(self.api_keys.values()))
        if unknown:
            raise ConfigError(f"GATEWAY_POST_RATES names callers GATEWAY_API_KEYS lacks: {', '.join(unknown)}")
        return self

    @field_validator("ops_keys", mode="before")
    @classmethod
    def _ops_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
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

    @model_validator(mode="after")
    def _ops_keys_are_not_api_keys(self) -> Self:
        if set(self.ops_keys) & set(self.api_keys):
            raise ConfigError("GATEWAY_OPS_KEYS and GATEWAY_API_KEYS share a key: an ops key must never open /v1")
        return self

    @field_validator("card_key", mode="before")
    @classmethod
    def _card_key(cls, value: object) -> object:
        return _card_secret("CARD_ENCRYPTION_KEY", value) if isinstance(value, str) else value

    @field_validator("card_keys", mode="before")
    @classmethod
    def _card_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys: list[CardKey] = []
        for number, pair in enumerate(value.split(","), 1):
            key_id, sep, secret = (part.strip() for part in pair.partition(":"))
            where = f"CARD_ENCRYPTION_KEYS (pair {number})"  # ids not echoed: a pair written backwards shows its key
            if not sep or not KEY_ID.fullmatch(key_id):
                raise ConfigError(f"{where} must be id:key, the id {KEY_ID_RULE}")
            keys.append(CardKey(key_id, _card_secret(where, secret)))
        if len({key.id for key in keys}) < len(keys):
            raise ConfigError("CARD_ENCRYPTION_KEYS names the same key id twice")
        if len({key.secret for key in keys}) < len(keys):
            raise ConfigError("CARD_ENCRYPTION_KEYS lists the same key twice")
        return tuple(keys)

    @model_validator(mode="after")
    def _one_way_to_give_card_keys(self) -> Self:
        if self.card_key is not None and self.card_keys:
            raise ConfigError(
                f"set CARD_ENCRYPTION_KEYS or CARD_ENCRYPTION_KEY, not both (CARD_ENCRYPTION_KEY=<key> is "
                f"CARD_ENCRYPTION_KEYS={SINGLE_KEY_ID}:<key>)"
            )
        return self

    @property
    def card_keyring(self) -> tuple[CardKey, ...]:
        """The card keys, newest first: CARD_ENCRYPTION_KEYS, or CARD_ENCRYPTION_KEY as the one
        key with id "default"; empty when neither is set."""
        if self.card_keys:
            return self.card_keys
        return (CardKey(SINGLE_KEY_ID, self.card_key),) if self.card_key is not None else ()

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return one_of("LOG_LEVEL", value, LOG_LEVELS)

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        return one_of("GATEWAY_ENV", value, ENVIRONMENTS)

    @property
    def development(self) -> bool:
        return self.environment == "development"

    def require_secrets(self, *, uses_card_key: bool) -> Self:
        """Fail closed: the secrets a gateway process needs, and none of the published ones.

        In production (the default) every gateway process insists on GATEWAY_API_KEYS and
        CARD_ENCRYPTION_KEY, whether or not it reads them itself: one configuration is checked
        the same way everywhere, so a deployment that forgot a secret stops at its first process.
        Development keys (sk_test_..., the card keys this repository published) and ops keys
        too weak to be random (ops_key_bits) are refused there. In development mode the
        documented key opens /v1 and only a process that seals or opens cards needs a card key."""
        problems = []
        if not self.development:
            if "api_keys" not in self.model_fields_set:
                problems.append(
                    "GATEWAY_API_KEYS is required (comma-separated name:key pairs); the documented "
                    "development key works only with GATEWAY_ENV=development"
                )
            elif any(key.startswith(DEV_API_KEY_PREFIX) for key in self.api_keys):
                problems.append(
                    f"GATEWAY_API_KEYS holds a development key ({DEV_API_KEY_PREFIX}...): refused unless "
                    "GATEWAY_ENV=development"
                )
            weak = sorted(name for key, name in self.ops_keys.items() if ops_key_bits(key) < OPS_KEY_MIN_BITS)
            if weak:
                problems.append(
                    f"GATEWAY_OPS_KEYS: the key of {', '.join(weak)} is too weak (under {OPS_KEY_MIN_BITS} bits by its "
                    "length and the spread of its characters); make keys with `gatewayctl ops-key NAME`"
                )
        if not self.card_keyring and (uses_card_key or not self.development):
            problems.append(
                "CARD_ENCRYPTION_KEY is required: 32 random bytes, base64 "
                "(make one with: python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'), "
                "or CARD_ENCRYPTION_KEYS=id:key,... to rotate keys"
            )
        elif not self.development:
            for key in self.card_keyring:
                if key.secret in PUBLISHED_CARD_KEYS:
                    where = f"CARD_ENCRYPTION_KEYS (key {key.id!r})" if self.card_keys else "CARD_ENCRYPTION_KEY"
                    problems.append(f"{where} is a published development key: refused unless GATEWAY_ENV=development")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


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


def _card_secret(where: str, value: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        raise ConfigError(f"{where} is not valid base64") from None
    if len(key) != 32:
        raise ConfigError(f"{where} must decode to 32 bytes, got {len(key)}")
    return key


def parse(env: Mapping[str, str], *, uses_card_key: bool | None = None) -> Settings:
    """The shared settings in `env`; with `uses_card_key` given, checked as a gateway process
    checks them at start (Settings.require_secrets)."""
    settings = Settings.parse(env)
    return settings if uses_card_key is None else settings.require_secrets(uses_card_key=uses_card_key)


def load(*, uses_card_key: bool) -> Settings:
    """A gateway process's shared settings from os.environ, its secrets required
    (Settings.require_secrets), or exit 2 with a clear message."""
    settings = Settings.load()
    return exit_on_error(lambda: settings.require_secrets(uses_card_key=uses_card_key))
