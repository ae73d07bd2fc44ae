"""The bounds every gateway process puts on its PostgreSQL pool (DB_*_TIMEOUT_SECONDS): the
values gateway.db.create_pool applies, and the variables that set them, checked to be in the
order that lets the server cancel a statement before the client gives up on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from pydantic import Field, model_validator

from gateway.config.env import ConfigError, EnvSettings, shown_value


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
            got = (self.db_lock_timeout, self.db_statement_timeout, self.db_command_timeout)
            raise ConfigError(
                "DB_LOCK_TIMEOUT_SECONDS < DB_STATEMENT_TIMEOUT_SECONDS < DB_COMMAND_TIMEOUT_SECONDS must hold "
                f"(the server cancels before the client gives up), got {', '.join(map(shown_value, got))}"
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
