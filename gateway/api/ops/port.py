"""What the console asks of the dead-letter desk, and what it reads in the answers.

The decisions about dead letters (what a replay does, the 24 h guard) are
gateway/ops/replay.py's, the queue gateway/ops/deadletters.py's: `gatewayctl dlq` and
the console must apply the same rules. The gateway does not import the
worker, except in gateway/api/ops/wiring.py, which builds the one
DeadLetterDesk the API uses from those modules. The pages depend on this
port only: the fields below are the whole of what they read (the policy's
own result types satisfy these protocols as they are, and mypy checks that
in wiring.py), and tests can stand a fake desk in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol


class ListedOperation(Protocol):
    """One line of the dead-letter listing (gateway.ops.replay.Entry)."""

    @property
    def operation_id(self) -> str | None: ...  # None: a letter that names no operation
    @property
    def payment_id(self) -> str | None: ...
    @property
    def kind(self) -> str | None: ...
    @property
    def attempts(self) -> int | None: ...
    @property
    def last_error(self) -> Any: ...
    @property
    def state(self) -> str: ...
    @property
    def needs_force(self) -> bool: ...
    @property
    def age(self) -> str | None: ...
    @property
    def messages(self) -> int: ...


class Letter(Protocol):
    """One message of payments.dead (gateway.ops.deadletters.DeadLetter)."""

    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def parked_at(self) -> datetime | None: ...


class OperationDetails(Protocol):
    """The operation's row, its payment's receipt, history and operations (gateway.ops.replay.Details)."""

    @property
    def operation(self) -> Mapping[str, Any]: ...
    @property
    def payment(self) -> Mapping[str, Any]: ...
    @property
    def history(self) -> Sequence[Mapping[str, Any]]: ...  # status, cause, at
    @property
    def operations(self) -> Sequence[Mapping[str, Any]]: ...


class ShownOperation(Protocol):
    """Everything about one operation (gateway.ops.replay.Shown)."""

    @property
    def operation_id(self) -> str: ...
    @property
    def details(self) -> OperationDetails | None: ...  # None: not in the database
    @property
    def dead_letters(self) -> Sequence[Letter]: ...
    @property
    def state(self) -> str: ...
    @property
    def needs_force(self) -> bool: ...
    @property
    def advice(self) -> str: ...


class ReplayOutcome(Protocol):
    """What a replay did to one operation (gateway.ops.replay.Replayed)."""

    @property
    def operation_id(self) -> str | None: ...
    @property
    def payment_id(self) -> str | None: ...
    @property
    def kind(self) -> str | None: ...
    @property
    def result(self) -> str: ...  # replayed, already_final, refused, unknown, unreadable, failed
    @property
    def message(self) -> str: ...
    @property
    def forced(self) -> bool: ...
    @property
    def done(self) -> bool: ...


class DeadLetterDesk(Protocol):
    """payments.dead and the parked operations, under the rules of `gatewayctl dlq`.

    Raises BrokerUnavailable (below) when RabbitMQ cannot be reached.
    """

    async def depth(self) -> int:
        """Messages in payments.dead now, read without taking any."""
        ...

    async def listing(self) -> Sequence[ListedOperation]: ...

    async def show(self, operation_id: str) -> ShownOperation | None:
        """None when neither the database nor the queue knows the operation."""
        ...

    async def replay(self, operation_id: str | None, *, force: bool, actor: str) -> Sequence[ReplayOutcome]:
        """One operation, or (None) every dead letter and parked operation. Each operation it
        unparks gets a history row naming `actor` (`ops:<actor>:replay`), in the unpark's transaction."""
        ...


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be reached: the dead-letter pages say so instead of failing."""
