"""gateway.api.health.Readiness: a burst of probes costs the database one query a second."""

from __future__ import annotations

import asyncio

import pytest

from gateway.api import health

# Nothing listens on port 1: the broker check fails at once, and is shared the same way.
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"


class CountingPool:
    """Stands for the asyncpg pool: counts the queries (SELECT 1) it is asked."""

    def __init__(self) -> None:
        self.queries = 0
        self.answer = asyncio.Event()

    async def fetchval(self, *_args: object) -> int:
        self.queries += 1
        await self.answer.wait()  # a slow database: every probe arrives while the first waits
        return 1


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: now[0])
    return now


async def test_concurrent_probes_share_one_query_and_its_answer_is_reused_for_a_second(clock):
    pool = CountingPool()
    readiness = health.Readiness(pool, NO_BROKER)  # type: ignore[arg-type]
    probes = [asyncio.create_task(readiness.check()) for _ in range(2000)]
    await asyncio.sleep(0)
    pool.answer.set()
    answers = await asyncio.gather(*probes)
    assert pool.queries == 1
    assert {tuple(a.items()) for a in answers} == {(("database", "ok"), ("broker", "failed"))}

    clock[0] += health.REUSE_SECONDS / 2
    await asyncio.gather(*(readiness.check() for _ in range(100)))
    assert pool.queries == 1  # still fresh

    clock[0] += health.REUSE_SECONDS
    assert (await readiness.check())["database"] == "ok"
    assert pool.queries == 2  # stale: asked again
