"""gateway/store/ without a database: loading the .sql files and mapping named parameters to `$n`.

The statements themselves run against real PostgreSQL in tests/integration.
"""

from __future__ import annotations

import importlib
import inspect
import re
from datetime import UTC, datetime

import pytest

from gateway import messages, store
from gateway.domain import OperationKind, Status
from tests.support import factories

AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Recorder:
    """A pool or connection that records what it is asked to run."""

    def __init__(self, result=None):
        self.result = result
        self.calls: list[tuple[str, str, tuple]] = []

    async def _call(self, method: str, sql: str, args: tuple):
        self.calls.append((method, sql, args))
        return self.result

    async def fetch(self, sql, *args):
        return await self._call("fetch", sql, args) or []

    async def fetchrow(self, sql, *args):
        return await self._call("fetchrow", sql, args)

    async def fetchval(self, sql, *args):
        return await self._call("fetchval", sql, args)

    async def execute(self, sql, *args):
        return await self._call("execute", sql, args)

    @property
    def only(self) -> tuple[str, str, tuple]:
        (call,) = self.calls
        return call


def placeholders(sql: str) -> list[int]:
    return sorted({int(n) for n in re.findall(r"\$(\d+)", sql)})


def test_every_statement_has_one_function_of_its_name():
    names = store.statements()
    assert len(names) >= 40
    for name in names:
        fn = getattr(store, name, None)
        assert fn is not None and inspect.iscoroutinefunction(fn), name
        params = list(inspect.signature(fn).parameters.values())[1:]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name


def test_each_sql_file_is_issued_by_the_store_module_of_its_name():
    for path in sorted(store.SQL_DIR.glob("*.sql")):
        module = importlib.import_module(f"gateway.store.{path.stem}")
        named = re.findall(r"(?m)^-- name: (\w+)", path.read_text())
        assert named and all(inspect.iscoroutinefunction(getattr(module, n, None)) for n in named), path.name
        assert all(getattr(store, n) is getattr(module, n) for n in named), path.name


def test_statements_are_rewritten_to_numbered_parameters():
    for name, sql in store.statements().items():
        assert not re.search(r"(?<![:\w]):[a-z_]+\b(?!:)", sql.replace("::", "  ")), name  # no :name left
        numbers = placeholders(sql)
        assert numbers == list(range(1, len(numbers) + 1)), name


def test_the_lock_key_is_the_schema_function_everywhere():
    with_lock = [n for n, sql in store.statements().items() if "pg_try_advisory_xact_lock" in sql]
    assert sorted(with_lock) == ["lock_idempotency_key", "lock_keys_and_payments", "submit_authorizations"]
    for name in with_lock:
        sql = store.statements()[name]
        lock = r"pg_try_advisory_xact_lock\(idempotency_lock_key\((\$1, \$2|a\.merchant, a\.key)\)\)"
        assert re.search(lock, sql), name
    assert "hashtextextended" not in "".join(store.statements().values())
    assert "FUNCTION idempotency_lock_key(merchant text, key text) RETURNS bigint" in store.SCHEMA_PATH.read_text()


async def test_a_name_used_twice_is_one_parameter_and_casts_and_strings_are_left_alone(tmp_path):
    path = tmp_path / "probe.sql"
    path.write_text(
        "-- a file comment\n\n"
        "-- name: probe^\n-- What it is.\n"
        "SELECT :b AS b, :a::int AS a, :b::text AS b_again, ':a' AS literal, now()::date AS today;\n\n"
        "-- name: touch!\nUPDATE t SET x = :x WHERE id = :id;\n"
    )
    queries = store.load(path)
    assert queries.probe.sql == (
        "SELECT $1 AS b, $2::int AS a, $1::text AS b_again, ':a' AS literal, now()::date AS today;"
    )
    db = Recorder({"b": 2})
    assert await queries.probe(db, a=1, b=2) == {"b": 2}
    assert db.only == ("fetchrow", queries.probe.sql, (2, 1))
    await queries.touch(db, id=7, x="y")
    assert db.calls[-1] == ("execute", "UPDATE t SET x = $1 WHERE id = $2;", ("y", 7))


async def test_a_missing_extra_or_positional_parameter_fails_on_the_call(tmp_path):
    path = tmp_path / "probe.sql"
    path.write_text("-- name: probe$\nSELECT :a + :b;\n")
    queries, db = store.load(path), Recorder()
    with pytest.raises(TypeError, match=r"takes \['a', 'b'\], got \['a'\]"):
        await queries.probe(db, a=1)
    with pytest.raises(TypeError, match=r"got \['a', 'b', 'c'\]"):
        await queries.probe(db, a=1, b=2, c=3)
    with pytest.raises(TypeError, match=r"got \['a', 'c'\]"):
        await queries.probe(db, a=1, c=3)
    with pytest.raises(ValueError, match="named parameters"):
        await queries.probe(db, 1, 2)
    assert db.calls == []


def _unnested(sql: str, args: tuple) -> dict[str, object]:
    """column of `unnest(...) AS s(columns)` -> the array passed for it."""
    arrays, columns = re.search(r"unnest\((.*?)\)\s+WITH ORDINALITY\s+AS s\((.*?)\)", sql, re.S).groups()
    numbers = [int(n) for n in re.findall(r"\$(\d+)", arrays)]
    names = [c.strip() for c in columns.split(",")]
    assert len(names) == len(numbers) + 1 and names[-1] == "n"  # + the ordinality
    return {name: args[n - 1] for name, n in zip(names[:-1], numbers, strict=True)}


async def test_finish_operations_puts_each_value_in_its_own_column():
    db = Recorder([{"operation_id": "op_1", "owner": "w/1"}])
    event = messages.event("payment.voided", {"id": "pay_2"}, AT, merchant="ficmart")
    common = dict(at=AT, error=None, bank_ms=120, cause="bank:void:succeeded", status_moved=True, notify="pay_1")
    recorded = await store.finish_operations(
        db,
        finishes=[
            store.Finish(
                operation_id="op_1",
                owner="w/1",
                operation_status="succeeded",
                bank_response={"void_id": "void_9"},
                payment_status=Status.VOIDED,
                drop_card=False,
                event=None,
                void_id="void_9",
                capture_id="cap_8",
                **common,
            ),
            store.Finish(
                operation_id="op_2",
                owner="w/2",
                operation_status="failed",
                bank_response=None,
                payment_status=Status.DECLINED,
                drop_card=True,
                event=event,
                **common,
            ),
        ],
    )
    assert recorded == {("op_1", "w/1")}
    _, sql, args = db.only
    column = _unnested(sql, args)
    assert column["operation_id"] == ["op_1", "op_2"] and column["owner"] == ["w/1", "w/2"]
    assert column["void_id"] == ["void_9", None] and column["capture_id"] == ["cap_8", None]
    assert column["authorization_id"] == [None, None] and column["refund_id"] == [None, None]
    assert column["payment_status"] == ["voided", "declined"] and column["drop_card"] == [False, True]
    assert column["event_exchange"] == [None, event.exchange] and column["event_body"] == [None, event.body]
    assert len(args) == placeholders(sql)[-1]
    for name in ("authorization_id", "authorization_expires_at", "capture_id", "void_id", "refund_id"):
        assert f"{name} = coalesce(s.{name}, p.{name})" in sql  # a bank id left null keeps the payment's


async def test_start_operations_takes_the_event_and_the_reply_as_optional_columns():
    cmd = messages.command("op_2", "capture")
    event = messages.event("payment.expired", {"id": "pay_1"}, AT, merchant="ficmart")
    req = factories.request("/v1/payments/pay_1/capture", b"{}", key="key-1")
    common = dict(at=AT, kind=OperationKind.CAPTURE, command=cmd)
    db = Recorder([{"id": "pay_1"}, {"id": "pay_2"}])
    moved = await store.start_operations(
        db,
        starts=[
            store.OperationStart(
                payment_id="pay_1",
                status=Status.CAPTURING,
                cause="api:capture",
                operation_id="op_2",
                bank_key="gw-op_2",
                reply=store.StoredReply(request=req, body=b'{"id":"pay_1"}'),
                **common,
            ),
            store.OperationStart(
                payment_id="pay_2",
                status=Status.EXPIRED,
                cause="sweeper:hold_expired",
                operation_id="op_3",
                bank_key="gw-op_3",
                event=event,
                **common,
            ),
        ],
    )
    assert moved == ["pay_1", "pay_2"]
    _, sql, args = db.only
    column = _unnested(sql, args)
    assert len(args) == placeholders(sql)[-1]
    assert column["payment_id"] == ["pay_1", "pay_2"] and column["status"] == ["capturing", "expired"]
    assert column["kind"] == ["capture", "capture"] and column["bank_key"] == ["gw-op_2", "gw-op_3"]
    assert column["command_message_id"] == [cmd.message_id] * 2
    assert column["merchant"] == ["ficmart", None] and column["key"] == ["key-1", None]
    assert column["path"] == ["/v1/payments/pay_1/capture", None] and column["method"] == ["POST", None]
    assert column["fingerprint"] == [req.fingerprint, None] and column["response_body"] == [b'{"id":"pay_1"}', None]
    assert column["event_message_id"] == [None, event.message_id] and column["event_body"] == [None, event.body]
    assert "WHERE s.key IS NOT NULL" in sql and "WHERE s.event_exchange IS NOT NULL" in sql


async def test_lock_keys_and_payments_sends_each_request_in_order_and_locks_payments_in_id_order():
    db = Recorder([])
    asked = [store.KeyAndPayment("ficmart", "k2", "pay_b"), store.KeyAndPayment("shop", "k1", "pay_a")]
    await store.lock_keys_and_payments(db, requests=asked)
    _, sql, args = db.only
    assert args == (["ficmart", "shop"], ["k2", "k1"], ["pay_b", "pay_a"])
    assert re.search(r"ORDER BY p\.id\s+FOR UPDATE", sql) and sql.rstrip().endswith("ORDER BY a.n;")


async def test_requeue_operations_sends_parallel_arrays_in_one_order():
    commands = {f"op_{i}": messages.command(f"op_{i}", "void") for i in range(3)}
    db = Recorder()
    await store.requeue_operations(db, commands=commands)
    _, sql, (ids, exchanges, routing_keys, message_ids, bodies, headers) = db.only
    assert "unnest($1::text[], $2::text[], $3::text[], $4::text[]" in sql
    assert ids == ["op_0", "op_1", "op_2"] and exchanges == [messages.COMMANDS_EXCHANGE] * 3
    assert routing_keys == ["void"] * 3 and message_ids == [c.message_id for c in commands.values()]
    assert bodies == [c.body for c in commands.values()] and headers == [c.headers for c in commands.values()]


async def test_results_come_back_typed():
    taken = await store.take_outbox_batch(Recorder([{"id": 9}, {"id": 2}, {"id": 5}]), limit=10, held_back=[])
    assert [r["id"] for r in taken] == [2, 5, 9]  # oldest first, whatever order DELETE returned them in
    assert await store.unpark_operation(Recorder("pay_1"), operation_id="op_1", forced=False) is True
    assert await store.unpark_operation(Recorder(None), operation_id="op_1", forced=False) is False
    assert await store.lapsed_holds(Recorder([{"id": "pay_1"}, {"id": "pay_2"}]), limit=5) == ["pay_1", "pay_2"]
    assert await store.ping(Recorder(1)) is True
    cursor = await store.payment_cursor(Recorder({"created_at": AT, "id": "pay_1"}), payment_id="pay_1", merchant="m")
    assert cursor == store.PageCursor(AT, "pay_1")
    db = Recorder()
    await store.payments_by_order(db, merchant="m", order_id="o", after=cursor, limit=11)
    await store.payments_by_customer(db, merchant="m", customer_id="c", after=None, limit=11)
    assert db.calls[0][2] == ("m", "o", AT, "pay_1", 11) and db.calls[1][2] == ("m", "c", None, None, 11)
