"""The worker's batched statements find each operation by its key, whatever the planner
believes of the backlog (gateway/sql/settlement.sql explains the `IS TRUE` form); the API's
batched submit costs each row the same at any batch size.

A database of its own holds a backlog of 5,000 pending operations beside 5,000 finished
ones, written faster than autoanalyze runs (no statistics: the planner's default guess of
pending operations is a few dozen). Each statement is planned for a batch of 30 and the
plan must reach `operations` through its primary key only: a scan of the pending
operations would cost, per batch, what the backlog holds."""

from __future__ import annotations

import datetime as dt
import re

import asyncpg
import orjson
import pytest

from gateway import store
from harness import services

BATCH = 30
UTC = dt.UTC


@pytest.fixture(scope="module")
async def backlog(server_urls):
    async with services.private_database(server_urls[0]) as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET session_replication_role = replica")  # no triggers: rows only
            await conn.execute(
                """INSERT INTO payments (id, merchant, order_id, customer_id, amount, currency, status,
                                         card_brand, card_last4, card_expiry_month, card_expiry_year,
                                         created_at, updated_at)
                   SELECT 'pay_' || i, 'm', 'o' || i, 'c', 100, 'USD', 'pending', 'visa', '4242', 1, 2030,
                          now(), now()
                     FROM generate_series(1, 10000) i"""
            )
            await conn.execute(
                """INSERT INTO operations (id, payment_id, kind, status, bank_key, lease_owner,
                                           created_at, updated_at)
                   SELECT 'op_' || i, 'pay_' || i, 'authorize',
                          CASE WHEN i <= 5000 THEN 'succeeded' ELSE 'pending' END, 'key_' || i, 'w', now(), now()
                     FROM generate_series(1, 10000) i"""
            )
            yield conn
        finally:
            await conn.close()


def nodes(plan: dict) -> list[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) tree."""
    return [plan, *(node for child in plan.get("Plans", []) for node in nodes(child))]


def batch_args(sql: str, ids: list[str]) -> list:
    """Arguments for a statement whose $1 is operation ids: each other parameter an array of a
    harmless value of its declared type (text: the owner the rows are leased to)."""
    types = {int(n): t for n, t in re.findall(r"\$(\d+)::(\w+)\[\]", sql)}
    sample = {
        "text": "w",
        "bigint": 1,
        "smallint": 1,
        "float8": 30.0,
        "integer": 0,
        "bytea": b"x",
        "jsonb": "{}",
        "boolean": False,
        "timestamptz": dt.datetime.now(UTC),
    }
    return [ids] + [[sample[types[n]]] * len(ids) for n in range(2, max(types) + 1)]


def how_operations_are_reached(explained: str) -> set[str]:
    """The indexes on `operations` the plan reads, and "Seq Scan" if it reads the table whole."""
    plan = nodes(orjson.loads(explained)[0]["Plan"])
    indexes = {n["Index Name"] for n in plan if n.get("Index Name", "").startswith("operations_")}
    scanned = {"Seq Scan" for n in plan if n["Node Type"] == "Seq Scan" and n["Relation Name"] == "operations"}
    return indexes | scanned


@pytest.mark.parametrize("plans", ["auto", "force_generic_plan"])  # asyncpg's prepared statements may be either
@pytest.mark.parametrize("name", ["claim_operations", "note_attempts", "finish_operations", "requeue_operations"])
async def test_a_batch_reaches_operations_by_key_with_a_backlog_the_planner_does_not_know(backlog, name, plans):
    await backlog.execute(f"SET plan_cache_mode = {plans}")
    sql = store.statements()[name]
    ids = [f"op_{i}" for i in range(7000, 7000 + BATCH)]
    explained = await backlog.fetchval("EXPLAIN (FORMAT JSON) " + sql, *batch_args(sql, ids))
    assert how_operations_are_reached(explained) == {"operations_pkey"}


@pytest.mark.parametrize("plans", ["auto", "force_generic_plan"])
async def test_a_submit_batch_costs_each_row_alike_whatever_its_size(backlog, plans):
    """The planner guesses a handful of rows for unnest: any join between the batch's rows
    (an insert's RETURNING with the rows asked) becomes a nested loop, every row compared with
    every other; in overload's batches of 260 that took 60% of the statement (bench/README)."""
    await backlog.execute(f"SET plan_cache_mode = {plans}")
    sql = store.statements()["submit_authorizations"]
    ids = [f"pay_new{i}" for i in range(260)]
    explained = await backlog.fetchval("EXPLAIN (FORMAT JSON) " + sql, *batch_args(sql, ids))
    plan = nodes(orjson.loads(explained)[0]["Plan"])
    assert [n["Node Type"] for n in plan if n["Node Type"] == "Nested Loop"] == []
