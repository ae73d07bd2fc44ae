"""Dead letters that name no readable operation (issue 11 row 11), against fakes: their handle,
how they are shown (redacted, cut), listed, reported by `replay --all` and chosen by `dlq drop`;
and an authorization whose card the vault purged, which no replay may send.
"""

from __future__ import annotations

import orjson
import pytest

from gateway.domain import CARD_PURGED
from gateway.ops import replay
from gateway.ops.deadletters import DeadLetter, read_letter
from tests.unit.test_replay import LIMIT, FakeOperations, Log, letter, operation, run

CARD = "4111 1111 1111 1111"


def raw(position: int, body: bytes, headers: dict | None = None, message_id: str | None = None) -> DeadLetter:
    return read_letter(position, body, headers, message_id)


# ---- handles ---------------------------------------------------------------------------------------


def test_a_letter_with_a_plain_message_id_goes_by_it():
    assert raw(0, b"x", {}, "cmd_0123abcd").handle == "cmd_0123abcd"


def test_a_letter_without_one_goes_by_a_hash_of_body_and_headers_that_survives_requeues():
    first = raw(0, b"not json", {"last_error": "bad"})
    # The quorum queue counts each requeue in x-delivery-count: the same letter read again.
    again = raw(7, b"not json", {"last_error": "bad", "x-delivery-count": 3})
    assert first.handle == again.handle and first.handle.startswith("sha-") and len(first.handle) == 20
    assert raw(0, b"not json!", {"last_error": "bad"}).handle != first.handle
    assert raw(0, b"not json", {"last_error": "worse"}).handle != first.handle


@pytest.mark.parametrize("message_id", ["", "x" * 81, "id with spaces", "op\x00", "caf\u00e9"])
def test_a_message_id_that_is_not_a_plain_token_is_not_a_handle(message_id):
    letter_ = raw(0, b"{}", {}, message_id)
    assert letter_.handle.startswith("sha-") and letter_.handle == raw(1, b"{}", {}, message_id).handle


@pytest.mark.parametrize(
    "op_id", ["op_\x00abc", "x" * 101, "op with space", "", 42, None, ["op_a"], "op_a\n", "op_<script>"]
)
def test_an_operation_id_that_could_not_be_ours_makes_a_letter_unreadable(op_id):
    by_body = raw(0, orjson.dumps({"operation_id": op_id}), None)
    by_header = raw(0, b"{}", {"operation_id": op_id} if isinstance(op_id, str) else {})
    assert by_body.operation_id is None and by_header.operation_id is None


# ---- what ops see of a letter ----------------------------------------------------------------------


def test_a_letter_is_shown_redacted_and_cut():
    body = (f'{{"card": "{CARD}", "cvv": "123", "pad": "' + "y" * 5000 + '"}').encode()
    headers = {"last_error": f"echo {CARD}", "note": "z" * 1000, **{f"h{i}": i for i in range(60)}}
    view = replay.view(raw(0, body, headers, "m" * 200))
    text = orjson.dumps(view.__dict__).decode()
    assert CARD not in text and "4111111111111111" not in text and '"123"' not in text and "[redacted]" in text
    assert len(view.body) < replay.BODY_LIMIT + 40 and "more characters" in view.body
    assert view.body_bytes == len(body)
    assert len(view.headers["note"]) < replay.HEADER_LIMIT + 40
    assert len(view.headers) == replay.HEADERS_SHOWN + 1 and "more header(s)" in view.headers["..."]
    assert len(view.message_id) < replay.HEADER_LIMIT + 40 and view.handle.startswith("sha-")


async def test_an_unreadable_letter_is_listed_by_its_handle_with_its_headers_redacted():
    odd = raw(0, b"\x00\xff", {"payment_id": f"pay {CARD}", "kind": "k" * 500, "attempts": "many"}, None)
    ops = FakeOperations(Log(), operation("op_a"))
    entries = await replay.listing([letter("op_a"), odd], ops, LIMIT)
    unreadable = entries[-1]
    assert unreadable.operation_id is None and unreadable.handles == [odd.handle]
    assert CARD not in unreadable.payment_id and "[redacted]" in unreadable.payment_id
    assert len(unreadable.kind) < replay.HEADER_LIMIT + 40 and unreadable.attempts is None
    assert entries[0].handles == [entries[0].handles[0]] and entries[0].operation_id == "op_a"


# ---- replay --all: a way out ------------------------------------------------------------------------


async def test_replay_all_names_each_unreadable_letter_and_the_command_that_removes_it():
    odd = raw(0, b"not json", {"last_error": "bad"})
    results, _, queue = await run([odd, letter("op_gone")], [])
    unreadable, unknown = results
    assert unreadable.result == "unreadable" and unreadable.handles == (odd.handle,)
    assert f"gatewayctl dlq show {odd.handle}" in unreadable.message
    assert f"gatewayctl dlq drop {odd.handle}" in unreadable.message and "--unreadable" in unreadable.message
    assert unknown.result == "unknown" and len(unknown.handles) == 1
    assert f"gatewayctl dlq drop {unknown.handles[0]}" in unknown.message
    assert queue.dropped == []  # replay never drops what it cannot judge


# ---- dlq drop ---------------------------------------------------------------------------------------


def test_drop_takes_the_named_letters_in_queue_order_and_reports_unknown_handles():
    a, odd, b = raw(0, b'{"operation_id": "op_a"}'), raw(1, b"x", {}), raw(2, b'{"operation_id": "op_b"}')
    plan = replay.to_drop([a, odd, b], handles=[b.handle, "nope", odd.handle, b.handle])
    assert plan.letters == [odd, b] and plan.not_found == ["nope"]


def test_drop_unreadable_takes_every_letter_without_a_readable_operation_id():
    a, odd1, odd2 = raw(0, b'{"operation_id": "op_a"}'), raw(1, b"x", {}), raw(2, b"y", {"operation_id": "op\x00"})
    plan = replay.to_drop([a, odd1, odd2], unreadable=True)
    assert plan.letters == [odd1, odd2] and plan.not_found == []
    assert replay.to_drop([a, odd1], handles=[odd1.handle], unreadable=True).letters == [odd1]


def test_the_same_message_twice_has_one_handle_and_is_dropped_together():
    one, two = raw(70, b"same", {"a": "1"}), raw(71, b"same", {"a": "1", "x-delivery-count": 1})
    assert replay.by_handle(one.handle, [one, two]) == [one, two]
    assert replay.to_drop([one, two], handles=[one.handle]).letters == [one, two]


# ---- a purged card -----------------------------------------------------------------------------------


def purged(**kw):
    op = operation("op_a", kind="authorize", **kw)
    error = {"code": CARD_PURGED, "message": "card purged"}
    return replay.Operation(**{**op.__dict__, "last_error": error})


@pytest.mark.parametrize("force", [False, True])
async def test_an_authorization_whose_card_is_purged_is_never_replayed(force):
    (result,), log, queue = await run([letter("op_a")], [purged()], operation_id="op_a", force=force)
    assert result.result == "refused" and not result.done and log == [] and queue.dropped == []
    assert "abandon" in result.message and "pay_of_op_a" in result.message


async def test_show_says_a_purged_authorization_can_only_be_abandoned():
    shown = await replay.show("op_a", [], FakeOperations(Log(), purged()), LIMIT)
    assert shown.advice.startswith("refused") and "abandon payment pay_of_op_a" in shown.advice
