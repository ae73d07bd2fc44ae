"""The dead-letter policy of gatewayctl (gateway/ops/replay.py), against fakes of the queue and the database.

Every path of a replay: unknown, already final, refused (key horizon) and
forced, replayed (parked, not parked, message gone), finished before the
unpark, publish failure after the unpark, unreadable letters; and what list
and show report. tests/integration/test_cli.py runs the same commands against
real PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from gateway.ops import replay
from gateway.ops.deadletters import DeadLetter, read_letter
from gateway.ops.replay import Details, Operation
from gateway.timefmt import iso, now

LIMIT = timedelta(hours=23)
ERROR = {"code": "bank_connection", "message": "connection refused"}


def operation(
    op_id: str,
    *,
    kind: str = "capture",
    status: str = "pending",
    parked: bool = True,
    first_attempt_hours_ago: float | None = 1,
    parked_minutes_ago: float = 5,
) -> Operation:
    at = now()
    return Operation(
        id=op_id,
        payment_id=f"pay_of_{op_id}",
        kind=kind,
        status=status,
        parked=parked,
        attempts=6,
        last_error=ERROR,
        first_attempt_at=None if first_attempt_hours_ago is None else at - timedelta(hours=first_attempt_hours_ago),
        updated_at=at - timedelta(minutes=parked_minutes_ago),
    )


_positions = iter(range(1_000_000))


def letter(op_id: str | None, **headers) -> DeadLetter:
    headers = {"payment_id": f"pay_of_{op_id}", "kind": "capture", **headers}
    if op_id is not None:
        headers["operation_id"] = op_id
    return DeadLetter(next(_positions), op_id, headers, orjson.dumps({"operation_id": op_id}))


class Log(list):
    """What the fakes did, in order, across both of them."""


class FakeQueue:
    """The part of payments.dead / payments.commands a replay uses."""

    def __init__(self, log: Log, *, publish_fails: bool = False):
        self.log = log
        self.publish_fails = publish_fails
        self.dropped: list[DeadLetter] = []

    async def drop(self, letters) -> None:
        letters = list(letters)
        self.dropped += letters
        if letters:
            self.log.append(("drop", [lt.operation_id for lt in letters]))

    async def send_command(self, operation_id: str, kind: str) -> None:
        if self.publish_fails:
            raise ConnectionResetError("broker went away")
        self.log.append(("send", operation_id, kind))


class FakeOperations:
    """The operations table; `finish_before_unpark` ids finish between the read and the unpark."""

    def __init__(self, log: Log, *ops: Operation, finish_before_unpark: tuple[str, ...] = ()):
        self.log = log
        self.rows = {op.id: op for op in ops}
        self.finish_before_unpark = finish_before_unpark

    async def find(self, operation_ids):
        return {i: self.rows[i] for i in operation_ids if i and i in self.rows}

    async def parked(self, limit: int):
        waiting = [op for op in self.rows.values() if op.status == "pending" and op.parked]
        return sorted(waiting, key=lambda op: op.updated_at)[:limit]

    async def unpark(self, operation_id: str, *, forced: bool) -> bool:
        if operation_id in self.finish_before_unpark:
            return False
        self.log.append(("unpark", operation_id, forced))
        return True

    async def details(self, operation_id: str):
        op = self.rows.get(operation_id)
        if op is None:
            return None
        row = {**op.__dict__, "bank_key": f"gw-{op.id}"}
        return Details(operation=row, payment={"id": op.payment_id}, history=[], operations=[row])


async def run(letters, ops, *, operation_id=None, force=False, publish_fails=False, finish_before_unpark=()):
    log = Log()
    queue = FakeQueue(log, publish_fails=publish_fails)
    operations = FakeOperations(log, *ops, finish_before_unpark=finish_before_unpark)
    results = await replay.replay(letters, queue, operations, operation_id=operation_id, force=force, limit=LIMIT)
    return results, log, queue


# ---- replay, one operation -------------------------------------------------------------------------


async def test_a_parked_operation_is_unparked_then_published_then_its_letters_dropped():
    letters = [letter("op_a"), letter("op_a")]  # the consumer may dead-letter one twice
    (result,), log, _ = await run(letters, [operation("op_a")], operation_id="op_a")
    assert log == [("unpark", "op_a", False), ("send", "op_a", "capture"), ("drop", ["op_a", "op_a"])]
    assert result.result == "replayed" and result.done and result.dead_letters_dropped == 2
    assert not result.forced and result.payment_id == "pay_of_op_a" and result.kind == "capture"
    assert "was parked" in result.message and "2 dead letter(s) removed" in result.message


async def test_an_operation_already_final_only_has_its_letters_dropped():
    letters = [letter("op_a")]
    (result,), log, _ = await run(letters, [operation("op_a", status="succeeded")], operation_id="op_a")
    assert log == [("drop", ["op_a"])]
    assert result.result == "already_final" and result.done and result.dead_letters_dropped == 1
    assert "already final (succeeded), nothing to do; dropped 1 dead letter(s)" == result.message

    (again,), log, _ = await run([], [operation("op_a", status="failed")], operation_id="op_a")
    assert log == [] and again.result == "already_final" and again.message == "already final (failed), nothing to do"


async def test_an_unknown_operation_is_not_done_and_its_letters_stay():
    (result,), log, queue = await run([letter("op_x")], [], operation_id="op_x")
    assert log == [] and queue.dropped == []
    assert result.result == "unknown" and not result.done and result.payment_id is None
    assert "left in the queue" in result.message


async def test_an_authorization_past_the_key_horizon_is_refused_without_force():
    old = operation("op_a", kind="authorize", first_attempt_hours_ago=23.5)
    (result,), log, queue = await run([letter("op_a")], [old], operation_id="op_a")
    assert log == [] and queue.dropped == []
    assert result.result == "refused" and not result.done
    assert "24 h" in result.message and "second hold" in result.message and "--force" in result.message
    assert "23h30m ago" in result.message and "limit 23 h" in result.message


async def test_force_sends_an_old_authorization_with_the_force_flag():
    old = operation("op_a", kind="authorize", first_attempt_hours_ago=30)
    (result,), log, _ = await run([letter("op_a")], [old], operation_id="op_a", force=True)
    assert log == [("unpark", "op_a", True), ("send", "op_a", "authorize"), ("drop", ["op_a"])]
    assert result.result == "replayed" and result.forced and "forced" in result.message


@pytest.mark.parametrize(
    "op",
    [
        operation("op_a", kind="authorize", first_attempt_hours_ago=1),  # young
        operation("op_a", kind="authorize", first_attempt_hours_ago=None),  # never sent
        operation("op_a", kind="capture", first_attempt_hours_ago=100),  # no key horizon for its bank call
    ],
)
async def test_only_old_authorizations_need_force(op):
    (result,), _, _ = await run([letter("op_a")], [op], operation_id="op_a")
    assert result.result == "replayed" and not result.forced


async def test_a_publish_failure_after_the_unpark_is_reported_and_the_letters_stay():
    (result,), log, queue = await run([letter("op_a")], [operation("op_a")], operation_id="op_a", publish_fails=True)
    assert log == [("unpark", "op_a", False)] and queue.dropped == []
    assert result.result == "failed" and not result.done
    assert "ConnectionResetError" in result.message and "sweeper re-enqueues" in result.message


async def test_an_operation_finished_before_the_unpark_is_final_and_its_letters_dropped():
    (result,), log, _ = await run(
        [letter("op_a")], [operation("op_a")], operation_id="op_a", finish_before_unpark=("op_a",)
    )
    assert log == [("drop", ["op_a"])]
    assert result.result == "already_final" and result.message == "finished meanwhile, nothing to do"


async def test_a_parked_operation_without_a_message_is_re_enqueued_from_its_row():
    (result,), log, _ = await run([], [operation("op_a")], operation_id="op_a")
    assert log == [("unpark", "op_a", False), ("send", "op_a", "capture")]
    assert result.result == "replayed" and "re-enqueued from the database" in result.message


async def test_a_pending_operation_not_parked_is_sent_again_harmlessly():
    (result,), log, _ = await run([letter("op_a")], [operation("op_a", parked=False)], operation_id="op_a")
    assert log == [("unpark", "op_a", False), ("send", "op_a", "capture"), ("drop", ["op_a"])]
    assert "was not parked" in result.message


async def test_replaying_one_operation_leaves_the_others_letters_alone():
    letters = [letter("op_a"), letter("op_b"), letter(None)]
    (result,), log, queue = await run(letters, [operation("op_a"), operation("op_b")], operation_id="op_b")
    assert result.operation_id == "op_b" and [lt.operation_id for lt in queue.dropped] == ["op_b"]
    assert ("unpark", "op_a", False) not in log


# ---- replay --all -----------------------------------------------------------------------------------


async def test_replay_all_takes_queue_order_then_parked_rows_and_reports_unreadable_letters():
    ops = [
        operation("op_a"),
        operation("op_b", status="succeeded"),
        operation("op_db_only", parked_minutes_ago=60),
        operation("op_old", kind="authorize", first_attempt_hours_ago=40),
    ]
    letters = [
        letter("op_a"),
        letter(None, payment_id="pay_q", kind="void"),
        letter("op_b"),
        letter("op_gone"),
        letter("op_old"),
        letter("op_a"),
    ]
    results, log, queue = await run(letters, ops)
    by_id = {r.operation_id: r for r in results}
    assert [r.operation_id for r in results] == [None, "op_a", "op_b", "op_gone", "op_old", "op_db_only"]
    assert {k: r.result for k, r in by_id.items()} == {
        None: "unreadable",
        "op_a": "replayed",
        "op_b": "already_final",
        "op_gone": "unknown",
        "op_old": "refused",
        "op_db_only": "replayed",
    }
    assert by_id[None].payment_id == "pay_q" and by_id[None].kind == "void" and not by_id[None].done
    assert [c[1] for c in log if c[0] == "send"] == ["op_a", "op_db_only"]
    assert sorted(lt.operation_id for lt in queue.dropped) == ["op_a", "op_a", "op_b"]  # the rest stay
    assert "re-enqueued from the database" in by_id["op_db_only"].message


async def test_replay_all_with_nothing_anywhere_does_nothing():
    results, log, _ = await run([], [operation("op_done", status="failed")])
    assert results == [] and log == []


# ---- list and show ----------------------------------------------------------------------------------


async def test_listing_shows_letters_in_queue_order_then_unreadable_then_parked_rows():
    ops = [
        operation("op_a"),
        operation("op_old", kind="authorize", first_attempt_hours_ago=30),
        operation("op_db_only", parked_minutes_ago=90),
        operation("op_done", status="succeeded", parked=False),
    ]
    first, second = now() - timedelta(hours=2), now() - timedelta(hours=1)
    letters = [
        letter("op_a", parked_at=iso(second)),
        letter("op_old"),
        letter(None, last_error='{"code": "bad", "message": "m"}', attempts=2),
        letter("op_a", parked_at=iso(first)),
        letter("op_done"),
        letter("op_unknown", kind="refund", attempts=3),
    ]
    entries = await replay.listing(letters, FakeOperations(Log(), *ops), LIMIT)
    assert [e.operation_id for e in entries] == ["op_a", "op_old", "op_done", "op_unknown", None, "op_db_only"]
    by_id = {e.operation_id: e for e in entries}
    assert [e.messages for e in entries] == [2, 1, 1, 1, 1, 0]
    assert by_id["op_a"].state == "parked" and by_id["op_a"].parked_since == iso(first)  # the first parking
    assert by_id["op_a"].age == "2h" and by_id["op_a"].attempts == 6 and by_id["op_a"].last_error == ERROR
    assert by_id["op_old"].needs_force and not by_id["op_a"].needs_force
    assert by_id["op_done"].state == "final (succeeded)"
    assert by_id["op_unknown"].state == "unknown operation"
    assert by_id["op_unknown"].kind == "refund" and by_id["op_unknown"].attempts == 3  # from the headers
    assert by_id[None].state == "unreadable message (no operation id)"
    assert by_id[None].last_error == {"code": "bad", "message": "m"}
    assert by_id["op_db_only"].state == "parked, no message in the queue"
    assert by_id["op_db_only"].age == "1h30m"  # parked since its row's last update


async def test_show_reports_state_and_what_a_replay_would_do():
    ops = FakeOperations(
        Log(),
        operation("op_a"),
        operation("op_old", kind="authorize", first_attempt_hours_ago=30),
        operation("op_done", status="failed"),
        operation("op_back", parked=False),
    )
    shown = await replay.show("op_a", [letter("op_a"), letter("op_b")], ops, LIMIT)
    assert shown.state == "parked" and [lt.operation_id for lt in shown.dead_letters] == ["op_a"]
    assert shown.details.operation["bank_key"] == "gw-op_a"
    assert shown.advice == "a replay unparks it and sends its command to the work queue"
    old = await replay.show("op_old", [], ops, LIMIT)
    assert old.needs_force and old.advice.startswith("refused without --force") and "23 h" in old.advice
    assert (await replay.show("op_done", [], ops, LIMIT)).advice.startswith("already final")
    assert (await replay.show("op_back", [], ops, LIMIT)).state == "pending, not parked"


async def test_show_of_an_operation_known_only_to_the_queue_or_to_nobody():
    ops = FakeOperations(Log())
    shown = await replay.show("op_x", [letter("op_x")], ops, LIMIT)
    assert shown.details is None and shown.state == "unknown operation"
    assert shown.advice == "unknown operation: nothing to replay"
    assert await replay.show("op_x", [letter("op_y")], ops, LIMIT) is None


# ---- reading a dead letter -------------------------------------------------------------------------


def test_a_letter_names_its_operation_by_header_else_by_body():
    by_header = read_letter(0, b"{}", {"operation_id": b"op_h", "parked_at": "2030-01-01T00:00:00Z"}, "m1")
    assert by_header.operation_id == "op_h" and by_header.headers["operation_id"] == "op_h"
    assert by_header.parked_at is not None and by_header.message_id == "m1"
    by_body = read_letter(1, b'{"operation_id": "op_b"}', None, None)
    assert by_body.operation_id == "op_b" and by_body.parked_at is None
    for body in (b"not json", b"[]", b'{"operation_id": 7}', b'{"operation_id": ""}', b"{}"):
        assert read_letter(2, body, {"operation_id": ""}, None).operation_id is None, body
    assert read_letter(3, b"{}", {"parked_at": "yesterday"}, None).parked_at is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (61, "1m1s"), (3600, "1h"), (5400, "1h30m"), (90000, "1d1h"), (86400, "1d")],
)
def test_age(seconds, text):
    assert replay.age(now() - timedelta(seconds=seconds, milliseconds=100)) == text
