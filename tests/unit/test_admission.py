"""Load shedding decisions (gateway/api/admission.py) and the refusal log line, without a server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.api import admission as admission_module
from gateway.api import middleware
from gateway.api.admission import Admission, Refused, WorkSlots


def admission(max_in_flight: int = 4, max_waiting: int = 2, max_new_work: int = 100) -> Admission:
    return Admission(
        max_in_flight=max_in_flight, max_new_work=max_new_work, max_lag=0.05, max_waiting=max_waiting, max_backlog=100
    )


def test_admits_below_capacity_and_refuses_a_lone_caller_at_it():
    gate = admission(max_in_flight=2)
    with contextlib.ExitStack() as held:
        assert gate.refusal("a", adds_work=True) is None
        held.enter_context(gate.working("a"))
        assert gate.refusal("a", adds_work=True) is None
        held.enter_context(gate.working("a"))
        refusal = gate.refusal("a", adds_work=True)
        assert refusal is not None and (refusal.status, refusal.code, refusal.reason) == (
            503,
            "service_unavailable",
            "overload",
        )
    assert gate.in_flight == 0 and gate.refusal("a", adds_work=True) is None


def test_at_capacity_the_caller_holding_its_share_gets_429_and_the_other_keeps_its_room():
    gate = admission(max_in_flight=4)
    with contextlib.ExitStack() as held:
        for _ in range(4):
            held.enter_context(gate.working("greedy"))
        alone = gate.refusal("greedy", adds_work=True)
        assert alone is not None and alone.status == 503  # nobody else wants room: the gateway is full
        assert gate.refusal("quiet", adds_work=True) is None  # its share is 2 of the 4
        held.enter_context(gate.working("quiet"))
        greedy = gate.refusal("greedy", adds_work=True)
        assert greedy is not None and (greedy.status, greedy.reason) == (429, "caller_share")
        assert gate.refusal("quiet", adds_work=True) is None
        held.enter_context(gate.working("quiet"))
        quiet = gate.refusal("quiet", adds_work=True)
        assert quiet is not None and quiet.status == 429
        assert gate.in_flight == 6  # past max_in_flight by less than max_in_flight


def test_a_lagging_loop_refuses_everyone_but_still_tells_the_greedy_caller_apart():
    gate = admission(max_in_flight=10)
    gate.lag = 0.2
    lone = gate.refusal("a", adds_work=True)
    assert lone is not None and (lone.status, lone.reason) == (503, "loop_lag")
    with contextlib.ExitStack() as held:
        for _ in range(5):
            held.enter_context(gate.working("a"))
        held.enter_context(gate.working("b"))
        other = gate.refusal("b", adds_work=True)
        assert other is not None and (other.status, other.reason) == (503, "loop_lag")
        greedy = gate.refusal("a", adds_work=True)
        assert greedy is not None and greedy.status == 429


def test_a_parked_long_poll_is_not_in_flight_while_it_waits_and_is_again_after():
    gate = admission(max_in_flight=1, max_waiting=1)
    with gate.working("a"):
        with gate.parked("a"):
            assert gate.in_flight == 0 and gate.waiting == 1
            assert gate.refusal("a", adds_work=True) is None
            refusal = gate.wait_refusal()
            assert refusal is not None and (refusal.status, refusal.reason) == (503, "long_polls")
        assert gate.in_flight == 1 and gate.waiting == 0
        assert gate.wait_refusal() is None
    assert gate.in_flight == 0


async def idle_backlog(most: int) -> int:
    return 0


def test_past_the_backlog_bound_new_work_is_refused_and_reads_are_not():
    gate = admission()
    gate.backlog = 100
    refusal = gate.refusal("a", adds_work=True)
    assert refusal is not None and (refusal.status, refusal.reason) == (503, "backlog")
    assert gate.refusal("a", adds_work=False) is None
    gate.backlog = 99
    assert gate.refusal("a", adds_work=True) is None


async def test_the_backlog_probe_asks_up_to_the_bound_and_keeps_the_last_count_when_the_database_fails():
    asked = []
    answers = iter([7, OSError("down")])

    async def count(most: int) -> int:
        asked.append(most)
        answer = next(answers, 9)
        if isinstance(answer, Exception):
            raise answer
        return answer

    gate = admission()
    gate.start(count)
    try:
        await asyncio.sleep(0.01)
        assert gate.backlog == 7
        await asyncio.sleep(0.3)  # the second probe failed: still 7
        assert gate.backlog == 7 and len(asked) == 2
        await asyncio.sleep(0.3)
        assert gate.backlog == 9
    finally:
        await gate.close()
    assert set(asked) == {100}


async def test_the_probe_measures_a_blocked_loop_and_forgets_it_gradually():
    gate = admission()
    gate.start(idle_backlog)
    try:
        await asyncio.sleep(0.06)
        busy_until = asyncio.get_running_loop().time() + 0.3
        while asyncio.get_running_loop().time() < busy_until:
            pass  # the loop is blocked: the probe's timer fires late
        await asyncio.sleep(0.01)
        assert gate.lag >= gate.max_lag
        peak = gate.lag
        await asyncio.sleep(0.5)
        assert gate.lag < peak / 2
    finally:
        await gate.close()


@pytest.mark.parametrize("n", [0, -1])
def test_refuses_nonsense_limits(n):
    with pytest.raises(ValueError):
        Admission(max_in_flight=n, max_new_work=1, max_lag=0.05, max_waiting=1, max_backlog=1)
    with pytest.raises(ValueError):
        Admission(max_in_flight=1, max_new_work=n, max_lag=0.05, max_waiting=1, max_backlog=1)
    with pytest.raises(ValueError):
        Admission(max_in_flight=1, max_new_work=1, max_lag=0.05, max_waiting=1, max_backlog=n)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def waiter(slots: WorkSlots, caller: str) -> asyncio.Task:
    task = asyncio.create_task(slots.take(caller))
    await asyncio.sleep(0)  # it queues
    return task


async def test_a_slot_given_back_goes_to_the_longest_waiter_and_nobody_overtakes(monkeypatch):
    monkeypatch.setattr(admission_module, "BURST_WAIT", 10.0)
    slots = WorkSlots(2)
    assert await slots.take("a") is None and await slots.take("a") is None
    first, second = await waiter(slots, "a"), await waiter(slots, "a")
    assert slots.queued == 2 and not first.done()
    slots.give_back("a")
    assert await first is None and not second.done()
    assert slots.used == 2 and slots.queued == 1
    slots.give_back("a")
    assert await second is None
    slots.give_back("a")
    slots.give_back("a")
    assert slots.used == 0 and slots.queued == 0
    assert await slots.take("a") is None  # free again at once


async def test_a_waiter_waits_out_a_burst_but_in_overload_the_surplus_is_refused_at_once(monkeypatch):
    clock = Clock()
    slots = WorkSlots(1, clock=clock)
    assert await slots.take("a") is None
    # No overload yet: a POST finding no slot waits up to BURST_WAIT for one, and gets it.
    monkeypatch.setattr(admission_module, "BURST_WAIT", 3600.0)
    task = await waiter(slots, "a")
    slots.give_back("a")
    assert await task is None and not slots.overloaded
    # Unserved for BURST_WAIT: refused, and that is overload ...
    monkeypatch.setattr(admission_module, "BURST_WAIT", 0.01)
    refusal = await asyncio.wait_for(slots.take("a"), 5)
    assert refusal is not None and (refusal.status, refusal.code, refusal.reason) == (
        503,
        "service_unavailable",
        "new_work",
    )
    assert slots.overloaded
    # ... in which a POST finding no slot is refused without waiting, and each refusal keeps it on.
    monkeypatch.setattr(admission_module, "BURST_WAIT", 3600.0)
    for _ in range(3):
        clock.now += admission_module.OVERLOAD_MEMORY * 0.9
        refusal = await asyncio.wait_for(slots.take("a"), 5)
        assert refusal is not None and refusal.reason == "new_work" and slots.queued == 0
    # A free slot is taken whatever the state; OVERLOAD_MEMORY without a refusal ends overload.
    slots.give_back("a")
    assert await slots.take("a") is None
    clock.now += admission_module.OVERLOAD_MEMORY
    assert not slots.overloaded
    task = await waiter(slots, "a")
    await asyncio.sleep(0.05)
    assert not task.done()
    slots.give_back("a")
    assert await task is None


async def test_a_caller_holding_its_share_of_the_slots_gets_429_at_once_and_the_other_waits(monkeypatch):
    monkeypatch.setattr(admission_module, "BURST_WAIT", 10.0)
    slots = WorkSlots(2)
    assert await slots.take("greedy") is None and await slots.take("greedy") is None
    quiet = await waiter(slots, "quiet")  # its share is 1 of the 2
    greedy = await slots.take("greedy")
    assert greedy is not None and (greedy.status, greedy.reason) == (429, "caller_share")
    slots.give_back("greedy")
    assert await quiet is None and slots.holders.holds_share("greedy", 2)


async def test_a_waiter_that_goes_away_takes_no_slot_with_it(monkeypatch):
    monkeypatch.setattr(admission_module, "BURST_WAIT", 10.0)
    slots = WorkSlots(1)
    assert await slots.take("a") is None
    gone, handed = await waiter(slots, "a"), await waiter(slots, "a")
    gone.cancel()
    await asyncio.sleep(0)
    assert slots.queued == 1
    slots.give_back("a")  # skips the one gone, hands the slot to the next
    handed.cancel()  # ... which is cancelled before it runs again: it gives the slot back
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert slots.used == 0 and slots.queued == 0
    assert await slots.take("a") is None


async def test_admitted_holds_a_slot_for_a_post_only_and_raises_refused_for_what_it_refuses(monkeypatch):
    monkeypatch.setattr(admission_module, "BURST_WAIT", 0.01)
    gate = admission(max_in_flight=10, max_new_work=1)
    async with gate.admitted("a", adds_work=True):
        assert gate.in_flight == 1 and gate.new_work.used == 1
        async with gate.admitted("a", adds_work=False):  # a read needs no slot
            assert gate.in_flight == 2 and gate.new_work.used == 1
        with pytest.raises(Refused) as refused:
            async with gate.admitted("a", adds_work=True):
                raise AssertionError("admitted past max_new_work")
        assert refused.value.refusal.reason == "new_work"
    assert gate.in_flight == 0 and gate.new_work.used == 0
    gate.backlog = 100
    with pytest.raises(Refused) as refused:
        async with gate.admitted("a", adds_work=True):
            raise AssertionError("admitted past max_backlog")
    assert refused.value.refusal.reason == "backlog" and gate.new_work.used == 0
    assert gate.new_work.overloaded  # new work refused for the backlog: no waiting for slots either


async def test_a_refused_read_is_not_overload_of_new_work():
    gate = admission(max_in_flight=1)
    with gate.working("a"), pytest.raises(Refused):
        async with gate.admitted("a", adds_work=False):
            raise AssertionError("admitted past max_in_flight")
    assert not gate.new_work.overloaded


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.lines.append((event, fields))


async def test_refusals_are_logged_as_one_line_a_second_with_counts_by_reason(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(middleware, "log", recorder)
    monkeypatch.setattr(middleware, "REFUSAL_LOG_SECONDS", 0.05)
    refusals = middleware.RefusalLog()
    for reason in ("new_work", "new_work", "backlog"):
        refusals.add(reason)
    assert recorder.lines == []  # nothing yet: one line when the period is over
    await asyncio.sleep(0.1)
    assert recorder.lines == [("requests refused for load", {"seconds": 0.05, "new_work": 2, "backlog": 1})]
    refusals.add("overload")
    refusals.flush()  # at shutdown: at once, and the pending line is not written twice
    await asyncio.sleep(0.1)
    assert recorder.lines[1:] == [("requests refused for load", {"seconds": 0.05, "overload": 1})]
