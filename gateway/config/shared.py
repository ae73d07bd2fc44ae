"""The settings every gateway process shares (gateway-api, gateway-relay, gateway-worker,
gateway-webhooks, gatewayctl): the environment mode, where the database, the broker and the bank
are, the callers' and operators' keys, the card keys, the log level and the database timeouts.
One configuration is checked the same way in every process, secrets included
(Settings.require_secrets), so a deployment that forgot one stops at its first process.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Self
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from gateway.cards import KEY_ID_RULE, SINGLE_KEY_ID, CardKey
from gateway.config import checks
from gateway.config.checks import MERCHANT_NAME_RULE
from gateway.config.database import DatabaseTimeouts
from gateway.config.env import ConfigError, exit_on_error, one_of

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
# Outside development an ops key must hold this much randomness by checks.ops_key_bits'
# estimate (`gatewayctl ops-key` makes keys of 256 bits).
OPS_KEY_MIN_BITS = 128


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
        return checks.database_url(value)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        return checks.amqp_url(value)

    @field_validator("bank_url")
    @classmethod
    def _bank_url(cls, value: str) -> str:
        return checks.checked_url("BANK_URL", value, ("http", "https")).rstrip("/")

    @model_validator(mode="after")
    def _bank_url_is_private(self) -> Self:
        """Card numbers and CVVs travel in the bank's requests: in clear only within this
        machine, or anywhere in development mode (compose's mock bank)."""
        parsed = urlparse(self.bank_url)
        if parsed.scheme != "https" and not self.development and not checks.is_loopback(parsed.hostname or ""):
            raise ConfigError(
                "BANK_URL must be https (card numbers and CVVs travel to the bank) unless its host is a "
                f"loopback address or GATEWAY_ENV=development, got {checks.shown_url(self.bank_url)}"
            )
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object) -> object:
        return checks.api_keys(value) if isinstance(value, str) else value

    @field_validator("post_rates", mode="before")
    @classmethod
    def _post_rates(cls, value: object) -> object:
        return checks.post_rates(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _post_rates_name_callers(self) -> Self:
        unknown = sorted(set(self.post_rates) - set(self.api_keys.values()))
        if unknown:
            raise ConfigError(f"GATEWAY_POST_RATES names callers GATEWAY_API_KEYS lacks: {', '.join(unknown)}")
        return self

    @field_validator("ops_keys", mode="before")
    @classmethod
    def _ops_keys(cls, value: object) -> object:
        return checks.ops_keys(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ops_keys_are_not_api_keys(self) -> Self:
        if set(self.ops_keys) & set(self.api_keys):
            raise ConfigError("GATEWAY_OPS_KEYS and GATEWAY_API_KEYS share a key: an ops key must never open /v1")
        return self

    @field_validator("card_key", mode="before")
    @classmethod
    def _card_key(cls, value: object) -> object:
        return checks.card_secret("CARD_ENCRYPTION_KEY", value) if isinstance(value, str) else value

    @field_validator("card_keys", mode="before")
    @classmethod
    def _card_keys(cls, value: object) -> object:
        return checks.card_keys(value) if isinstance(value, str) else value

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
        too weak to be random (checks.ops_key_bits) are refused there. In development mode the
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
            weak = sorted(name for key, name in self.ops_keys.items() if checks.ops_key_bits(key) < OPS_KEY_MIN_BITS)
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
