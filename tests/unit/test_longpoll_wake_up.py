"""The long polls' wake-up (settlement.wake_up -> PaymentWatcher): the payment comes through whole.

Its payload is "<id> <json>": a payment id holds no space, so the first space ends it, whatever
the payment says (a merchant's name once stood between them and broke the split when it held
a space). A wake-up reaches its waiter only once the LISTEN connection has answered after it
(a primary shutting down delivers notifications of commits the new primary never had).
"""

from __future__ import annotations

import orjson

from gateway.api.longpoll import CHANNEL, PaymentWatcher
from gateway.payments import settlement

PAYMENT = {
    "id": "pay_" + "ab" * 16,
    "status": "declined",
    "last_error": {"code": "insufficient_funds", "message": "the card has insufficient funds", "retryable": False},
}


def _woken(payload: str) -> bytes | None:
    watcher = PaymentWatcher("postgresql://unused")
    with watcher.watch(PAYMENT["id"]) as waiter:
        watcher._notified(None, 0, CHANNEL, payload)
        assert not waiter.event.is_set()
        watcher._pass_on()  # what the listener does once its ping is answered
        assert waiter.event.is_set()
        return waiter.body


def test_a_wake_up_carries_the_payment_whole():
    body = _woken(settlement.wake_up(PAYMENT))
    assert body is not None and orjson.loads(body) == PAYMENT


def test_a_payment_too_large_for_a_notify_wakes_with_its_id_alone():
    large = {**PAYMENT, "history": [{"status": "pending", "at": "x" * 100}] * 100}
    payload = settlement.wake_up(large)
    assert payload == PAYMENT["id"] and _woken(payload) is None


def test_wake_ups_count_the_payments_finished_while_listening_only():
    """Admission's completion rate comes from this count: unknown while wake-ups may be missed."""
    watcher = PaymentWatcher("postgresql://unused")
    watcher._notified(None, 0, CHANNEL, settlement.wake_up(PAYMENT))
    assert watcher.finished_so_far() is None  # not listening
    watcher._connected.set()
    watcher._notified(None, 0, CHANNEL, PAYMENT["id"])
    assert watcher.finished_so_far() == 2


def test_a_wake_up_heard_just_before_the_listen_connection_died_makes_the_waiter_read():
    watcher = PaymentWatcher("postgresql://unused")
    with watcher.watch(PAYMENT["id"]) as waiter:
        watcher._notified(None, 0, CHANNEL, settlement.wake_up(PAYMENT))
        assert not waiter.event.is_set()
        watcher._wake_all()  # the connection was lost before the ping came back
        assert waiter.event.is_set() and waiter.body is None
        waiter.event.clear()
        watcher._pass_on()  # nothing left over to pass on after a reconnection
        assert not waiter.event.is_set()
