"""SIGKILL the real processes at their worst moments while traffic flows; nothing may be lost or doubled.

The kills come from the crash points of gateway/crashpoints.py:
    api.after_commit      the API committed a request and dies before answering; FicMart's
                          client sees a connection error and retries with the same
                          Idempotency-Key, as it would in production
    relay.after_publish   the broker confirmed a batch that is not yet marked published
    worker.after_bank     the bank did the work, the outcome is not saved
    worker.after_record   the outcome is saved, the command not acked
A supervisor restarts every process that died (tests/crash/harness.py). During the run,
once or more:
  - the broker "restarts" for the gateway: every AMQP connection of the run's private
    vhost is closed (`rabbitmqctl close_all_connections --vhost ...`). Not
    `stop_app/start_app`: RabbitMQ is shared with other engineers' test runs;
  - the database "restarts" for the gateway: pg_terminate_backend on every connection to
    the run's private database (except the test's own). Not `pg_ctlcluster ... restart`:
    PostgreSQL is shared too, and a restart would break everyone else's tests.
The mock bank also fails 5% of requests, loses 5% of its answers and takes 0-300 ms.

After the traffic, the processes come back unarmed, the stack is left to become
quiescent, and the audit asserts: every accepted operation is final (or parked with
attention_required), one payment per order, no bank operation missing or doubled
(ledger vs receipts, per payment: holds, captures, voids, refunds), no event missing
or doubled (by event_id, one per settled status in the history), no outbox row unsent,
and no process died other than at a crash point.

Default run: 150 payments, each crash point armed twice (8 kills), one broker cut and one
database cut (about 15-25 s). `make test-long`: 1000 payments, every crash point armed with
a probability in every process life (about a hundred kills), three broker cuts and three
database cuts (about 2-3 minutes). Both print a summary line.
"""

from __future__ import annotations

import random
import shutil
from urllib.parse import urlparse

import pytest

from tests.crash.harness import PASSES, ProbabilityPolicy, QuotaPolicy, crash_run


@pytest.fixture(autouse=True)
def _local_broker(server_urls):
    """The broker cut needs rabbitmqctl on the broker's host (a private vhost)."""
    if not shutil.which("rabbitmqctl") or urlparse(server_urls[1]).hostname not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip("the crash runs close the connections of a private vhost with rabbitmqctl")


def _report(capsys, label: str, summary) -> None:
    with capsys.disabled():
        print(f"\n[{label}] {summary.line()}")


@pytest.mark.timeout(240)
async def test_crashes_at_every_point_lose_and_double_nothing(server_urls, card_key, capsys):
    policy = QuotaPolicy(kills_per_point=2, rng=random.Random(7))
    summary = await crash_run(
        server_urls, card_key, policy, payments=150, concurrency=30, broker_cuts=1, db_cuts=1, seed=7, drain_timeout=120
    )
    _report(capsys, "crash", summary)
    assert not summary.problems(), "\n".join(summary.problems())
    assert all(summary.kills[p] >= 1 for p in PASSES), summary.kills  # each point was armed twice and fired
    assert summary.broker_cuts == 1 and summary.db_cuts == 1


@pytest.mark.long
@pytest.mark.timeout(1800)
async def test_long_crash_run(server_urls, card_key, capsys):
    policy = ProbabilityPolicy(
        {
            "api.after_commit": 0.01,
            "relay.after_publish": 0.01,
            "worker.after_bank": 0.012,
            "worker.after_record": 0.012,
        }
    )
    summary = await crash_run(
        server_urls,
        card_key,
        policy,
        payments=1000,
        concurrency=40,
        broker_cuts=3,
        db_cuts=3,
        seed=11,
        drain_timeout=300,
    )
    _report(capsys, "crash-long", summary)
    assert not summary.problems(), "\n".join(summary.problems())
    assert sum(summary.kills.values()) >= 40 and all(summary.kills[p] for p in PASSES), summary.kills
