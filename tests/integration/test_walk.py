"""The capture's walk through the worker (scripts/walk.py, docs/walkthrough.md), run for real:
the reading goes one way. No module calls back up into one that called it (the ack once
did: handling called AmqpDelivery.ack in consumer.py, the module that had called handling),
and the walk passes the modules the walkthrough names, in its order."""

from __future__ import annotations

import pytest

from scripts import walk

pytestmark = pytest.mark.timeout(120)

READING_ORDER = [
    "worker/consumer.py",
    "worker/handling.py",
    "worker/db_pause.py",
    "worker/bank_gate.py",
    "worker/payments.py",
    "gateway/payments/settlement.py",
    "worker/bank.py",
]


async def test_a_capture_walks_down_without_calling_back_up(server_urls):
    figures = walk.Figures.of(await walk.walk(*server_urls))

    assert figures.callbacks == {}, figures.callbacks
    first_entries = list(dict.fromkeys(figures.walk))
    assert first_entries == READING_ORDER, figures.walk
