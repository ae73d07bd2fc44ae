"""What the worker takes from a delivered command's AMQP properties (worker.delivery.AmqpDelivery)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker.delivery import AmqpDelivery
from worker.metrics import WorkerMetrics


def delivered(headers: dict, *, redelivered: bool) -> AmqpDelivery:
    message = SimpleNamespace(
        body=b'{"operation_id": "op_1"}', message_id="cmd_1", headers=headers, redelivered=redelivered
    )
    return AmqpDelivery(message, retry=None, default=None, metrics=WorkerMetrics())  # type: ignore[arg-type]


@pytest.mark.parametrize("forged", [{"x-delivery-count": 999}, {"x-delivery-count": "999"}, {}])
def test_a_first_delivery_counts_once_whatever_its_publisher_wrote(forged):
    assert delivered(forged, redelivered=False).deliveries == 1


def test_a_redelivery_counts_what_the_broker_wrote():
    # A quorum queue writes x-delivery-count on every redelivery (over any publisher's value).
    assert delivered({"x-delivery-count": 3}, redelivered=True).deliveries == 4
    assert delivered({"x-delivery-count": "junk"}, redelivered=True).deliveries == 1
