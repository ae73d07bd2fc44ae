"""How the store reads its .sql files and sends their statements: an aiosql adapter for asyncpg.

The statements live in gateway/sql/*.sql, one file per store module, each under an aiosql
header `-- name: statement<op>` (`^` one row, `$` one value, `!` execute, none: all rows)
with named parameters (`:operation_id`). Each module loads its file once, at import, and
the statements are rewritten to asyncpg's `$n` then: the text sent is the same on every
call, so asyncpg's statement cache prepares each once per connection.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, TypeAlias

import aiosql
import asyncpg
from aiosql.adapters.asyncpg import AsyncPGAdapter
from asyncpg.pool import PoolConnectionProxy

Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Executor: TypeAlias = asyncpg.Pool | Connection

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


class _Adapter(AsyncPGAdapter):
    """aiosql's asyncpg adapter, minus two things.

    It calls the pool or connection it is given directly: asyncpg's Pool has
    fetch/fetchrow/fetchval/execute of its own, while the stock adapter asks
    `"acquire" in dir(client)` on every call (16 us here, a tenth of a round
    trip). And it takes exactly the statement's parameters: the stock adapter
    ignores a keyword the statement does not use.
    """

    def maybe_order_params(self, query_name: str, parameters: Any) -> list[Any]:
        names = self.var_sorted[query_name]
        try:
            if len(parameters) == len(names):
                return [parameters[name] for name in names]
        except KeyError:
            pass
        raise TypeError(f"statement {query_name} takes {sorted(names)}, got {sorted(parameters)}")

    async def select(
        self, conn: Any, query_name: str, sql: str, parameters: Any, record_class: Any = None
    ) -> AsyncGenerator[asyncpg.Record, None]:
        for row in await conn.fetch(sql, *self.maybe_order_params(query_name, parameters)):
            yield row

    async def select_one(
        self, conn: Any, query_name: str, sql: str, parameters: Any, record_class: Any = None
    ) -> asyncpg.Record | None:
        return await conn.fetchrow(sql, *self.maybe_order_params(query_name, parameters))

    async def select_value(self, conn: Any, query_name: str, sql: str, parameters: Any) -> Any:
        return await conn.fetchval(sql, *self.maybe_order_params(query_name, parameters))

    async def insert_update_delete(self, conn: Any, query_name: str, sql: str, parameters: Any) -> Any:
        """The command status, e.g. "DELETE 3"."""
        return await conn.execute(sql, *self.maybe_order_params(query_name, parameters))


def load(path: Path) -> Any:
    """The statements of one .sql file, as aiosql query functions."""
    return aiosql.from_path(path, _Adapter, mandatory_parameters=False, attribute=None)


def statements() -> dict[str, str]:
    """Statement name -> the SQL text sent to PostgreSQL, of every file in gateway/sql (for the
    bench's round-trip census and the tests that hold each statement to its function)."""
    found: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        queries = load(path)
        for name in queries.available_queries:
            fn = getattr(queries, name)
            # aiosql adds a `<name>_cursor` context manager for each SELECT: not a statement of its own.
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                found[name] = fn.sql
    return found


async def all_rows(query: Any, db: Executor, **params: Any) -> list[asyncpg.Record]:
    """Every row of a statement without an operator suffix (aiosql yields them one by one)."""
    return [row async for row in query(db, **params)]
