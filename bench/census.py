"""Round-trip census: run a gateway console script with its database and broker calls counted.

    python -m bench.census gateway-api [args...]     (BENCH_CENSUS_OUT=/path/file.json)

Used by `bench.run --census`. Before the script's main() runs, asyncpg's
Connection.execute/_execute and aio-pika's Exchange.publish / IncomingMessage.ack
are wrapped with a counter (a dict increment per call, ~1 us against a round
trip's ~100 us). Each statement is named after its gateway/sql entry
(store.<name>) where it is one; statements outside a transaction block are
counted as transactions of their own ("autocommit"). SIGUSR1 writes the
counters to BENCH_CENSUS_OUT;
so does a normal exit. The bench takes a census before and after a phase and
divides the difference by the payments of the phase.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

COUNTS: Counter = Counter()


def _name(query: str, names: dict[str, str]) -> str:
    text = query.strip()
    if text in names:
        return names[text]
    head = text.split(None, 1)[0].upper().rstrip(";") if text else ""
    if head in ("BEGIN", "COMMIT", "ROLLBACK", "START"):
        return head
    if "pg_advisory_unlock_all" in text:
        return "pool reset query (asyncpg default)"
    return " ".join(text.split())[:60]


Method = Callable[..., Any]


def _patch(cls: type, name: str, wrap: Callable[[Method], Method]) -> None:
    """Replace the method `name` of `cls` by `wrap` of the original (a census-only monkeypatch)."""
    setattr(cls, name, wrap(getattr(cls, name)))


def install() -> None:
    import aio_pika
    import asyncpg.connection as apc

    from gateway import store

    names = {text.strip(): f"store.{name}" for name, text in store.statements().items()}

    def note(conn: apc.Connection, query: str) -> None:
        name = _name(query, names)
        COUNTS[f"pg stmt: {name}"] += 1
        COUNTS["pg round trips"] += 1
        if name == "BEGIN":
            COUNTS["pg transactions"] += 1
        elif not conn.is_in_transaction() and name not in ("COMMIT", "ROLLBACK"):
            COUNTS["pg transactions"] += 1
            COUNTS["pg autocommit statements"] += 1

    def count_execute(execute: Method) -> Method:
        # execute() with arguments goes through _execute, counted there: count only the plain form here.
        async def counted(self: apc.Connection, query: str, *args: Any, timeout: float | None = None) -> Any:
            if not args:
                note(self, query)
            return await execute(self, query, *args, timeout=timeout)

        return counted

    def count_private_execute(execute: Method) -> Method:
        async def counted(self: apc.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
            note(self, query)
            return await execute(self, query, *args, **kwargs)

        return counted

    def count_publish(publish: Method) -> Method:
        async def counted(self: aio_pika.Exchange, message: Any, routing_key: str, *args: Any, **kwargs: Any) -> Any:
            COUNTS[f"amqp publish: {self.name or '(default)'}"] += 1
            return await publish(self, message, routing_key, *args, **kwargs)

        return counted

    def count_ack(ack: Method) -> Method:
        # aio-pika's ack is a coroutine in some versions and a plain method in others.
        if inspect.iscoroutinefunction(ack):

            async def counted_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                COUNTS["amqp ack"] += 1
                return await ack(self, *args, **kwargs)

            return counted_async

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            COUNTS["amqp ack"] += 1
            return ack(self, *args, **kwargs)

        return counted

    _patch(apc.Connection, "execute", count_execute)
    _patch(apc.Connection, "_execute", count_private_execute)
    _patch(aio_pika.Exchange, "publish", count_publish)
    _patch(aio_pika.IncomingMessage, "ack", count_ack)


def dump(*_args) -> None:
    path = os.environ.get("BENCH_CENSUS_OUT")
    if not path:
        return
    import json

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(COUNTS), f)
    os.replace(tmp, path)


def main() -> None:
    script, *args = sys.argv[1:]
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name=script)
    install()
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [script, *args]
    entry = entry_point.load()
    try:
        result = entry()
    finally:
        dump()
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
