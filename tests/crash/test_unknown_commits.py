"""Commits whose outcome is unknown: the connection dies while COMMIT is on its way.

When a database primary dies (or fails over) mid-commit, the process that sent COMMIT
cannot tell whether it happened. The gateway treats such a commit as unknown, never as
failed-and-safe or done: the API answers an error and FicMart retries under the same
Idempotency-Key, a worker leaves the command unacked (redelivered, the operation resumed
from what the database holds, the bank asked under the same key), the relay publishes
its rows again (consumers dedupe on message_id).

Every gateway process reaches the database through a multi-host DATABASE_URL whose first
host is down and whose second is a proxy (tests/support/tcpproxy.py) that cuts every
CUT_EVERY-th COMMIT: alternately after the server has committed (the client never hears)
and before the server sees it. FicMart's flows run through it; the crash audit then
asserts nothing lost, doubled or stuck and no process dead (none is restarted by hand).
"""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from harness.procs import free_port
from tests.crash.harness import BANK_CHAOS, ProbabilityPolicy, run_on
from tests.e2e.stack import Stack
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(300)

CUT_EVERY = 9


def _through(admin_url: str, dead_port: int, proxy: TcpProxy, database: str) -> str:
    user = urlparse(admin_url).netloc.rpartition("@")[0]
    hosts = f"127.0.0.1:{dead_port},127.0.0.1:{proxy.port}"
    return f"postgresql://{user}@{hosts}/{database}?target_session_attrs=read-write&sslmode=disable"


async def test_commits_cut_mid_flight_lose_and_double_nothing(server_urls, card_key):
    admin = urlparse(server_urls[0])
    proxy = await TcpProxy((admin.hostname or "127.0.0.1", admin.port or 5432), cut_commit_every=CUT_EVERY).start()
    dead_port = free_port()  # the first host of the URL: nobody listens there
    stack = Stack(
        server_urls,
        card_key,
        bank_env=BANK_CHAOS,
        gateway_env={"LOG_LEVEL": "info"},
        event_queue="unknown-commits.events",
        env_for=lambda _kind, _name: {"DATABASE_URL": _through(server_urls[0], dead_port, proxy, stack.database_name)},
    )
    try:
        await stack.start()
        summary = await run_on(
            stack,
            ProbabilityPolicy({}),  # no crash point armed: the cut commits are the only faults
            payments=100,
            concurrency=20,
            broker_cuts=0,
            db_cuts=0,
            seed=22,
            drain_timeout=120,
            bank_forgets_keys=False,
        )
    finally:
        await stack.close()
        await proxy.close()
    print(f"\nunknown commits: cut after commit={proxy.cut_after} before={proxy.cut_before}; {summary.line()}")
    assert proxy.cut_after >= 5 and proxy.cut_before >= 5, "the run must actually cut commits both ways"
    assert not summary.restarts, f"processes died and were restarted: {dict(summary.restarts)}"
    summary.raise_problems()
