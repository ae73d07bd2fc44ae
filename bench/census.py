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


def install() -> None:
    import aio_pika
    import asyncpg.connection as apc

    from gateway import store

    names = {text.strip(): f"store.{name}" for name, text in store.statements().items()}
    execute, _execute = apc.Connection.execute, apc.Connection._execute

    def note(conn, query: str) -> None:
        name = _name(query, names)
        COUNTS[f"pg stmt: {name}"] += 1
        COUNTS["pg round trips"] += 1
        if name == "BEGIN":
            COUNTS["pg transactions"] += 1
        elif not conn.is_in_transaction() and name not in ("COMMIT", "ROLLBACK"):
            COUNTS["pg transactions"] += 1
            COUNTS["pg autocommit statements"] += 1

    async def counted_execute(self, query, *args, timeout=None):
        if not args:
            note(self, query)
        return await execute(self, query, *args, timeout=timeout)

    async def counted__execute(self, query, *args, **kwargs):
        note(self, query)
        return await _execute(self, query, *args, **kwargs)

    apc.Connection.execute = counted_execute
    apc.Connection._execute = counted__execute

    publish = aio_pika.Exchange.publish

    async def counted_publish(self, message, routing_key, *args, **kwargs):
        COUNTS[f"amqp publish: {self.name or '(default)'}"] += 1
        return await publish(self, message, routing_key, *args, **kwargs)

    aio_pika.Exchange.publish = counted_publish
    ack = aio_pika.IncomingMessage.ack
    if inspect.iscoroutinefunction(ack):

        async def counted_ack(self, *args, **kwargs):
            COUNTS["amqp ack"] += 1
            return await ack(self, *args, **kwargs)
    else:

        def counted_ack(self, *args, **kwargs):
            COUNTS["amqp ack"] += 1
            return ack(self, *args, **kwargs)

    aio_pika.IncomingMessage.ack = counted_ack


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
