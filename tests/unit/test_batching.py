"""gateway/batching.py: requests that gather while batches run go together; a failed batch
is sent again request by request, so each request gets its own result or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.batching import Batcher


class Statement:
    """A batch statement that doubles its inputs, fails on a negative one, and is held open
    until released (to let requests gather)."""

    def __init__(self, *, hold: bool = False):
        self.sent: list[list[int]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, requests: Sequence[int]) -> list[int]:
        self.sent.append(list(requests))
        await self.release.wait()
        if any(r < 0 for r in requests):
            raise ValueError(f"refused {min(requests)}")
        return [r * 2 for r in requests]


async def test_a_request_alone_goes_at_once():
    statement = Statement()
    batcher = Batcher(statement)
    assert await batcher.submit(4) == 8
    assert statement.sent == [[4]]


async def test_requests_that_come_while_batches_run_go_in_one_statement_in_order():
    statement = Statement(hold=True)
    batcher = Batcher(statement, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    statement.release.set()
    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8]
    assert statement.sent == [[1], [2, 3, 4]]
    assert (batcher.batches, batcher.requests) == (2, 4)


async def test_batches_are_bounded_in_size_and_in_number_running():
    statement = Statement(hold=True)
    batcher = Batcher(statement, max_size=2, max_in_flight=2)
    tasks = [asyncio.create_task(batcher.submit(n)) for n in range(1, 8)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert statement.sent == [[1], [2]]  # two running; the rest wait
    statement.release.set()
    assert await asyncio.gather(*tasks) == [2, 4, 6, 8, 10, 12, 14]
    assert statement.sent == [[1], [2], [3, 4], [5, 6], [7]]


async def test_a_failed_batch_is_sent_again_request_by_request():
    statement = Statement(hold=True)
    batcher = Batcher(statement, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in (2, -3, 4)]
    await asyncio.sleep(0)
    statement.release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], ValueError) and str(results[2]) == "refused -3"  # that request's error alone
    assert statement.sent == [[1], [2, -3, 4], [2], [-3], [4]]


async def test_a_failure_of_a_lone_request_is_its_own():
    batcher = Batcher(Statement())
    with pytest.raises(ValueError, match="refused -1"):
        await batcher.submit(-1)
    assert await batcher.submit(5) == 10  # and the batcher goes on


async def test_a_request_given_up_by_its_caller_does_not_end_the_batch_it_is_in():
    statement = Statement(hold=True)
    batcher = Batcher(statement, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    quitter, stayer = asyncio.create_task(batcher.submit(2)), asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    first.cancel()  # the caller whose request started the first batch
    quitter.cancel()
    statement.release.set()
    assert await stayer == 6
    assert statement.sent == [[1], [2, 3]]  # both statements ran to their end


async def test_a_batch_interrupted_fails_its_requests_instead_of_leaving_them_waiting():
    statement = Statement(hold=True)
    batcher = Batcher(statement)
    waiting = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    for task in list(batcher._tasks):
        task.cancel()  # the loop shutting down under it
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 1)
