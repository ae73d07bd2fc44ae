"""Load shedding decisions (gateway/api/admission.py), without a server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.api.admission import Admission


def admission(max_in_flight: int = 4, max_waiting: int = 2) -> Admission:
    return Admission(max_in_flight=max_in_flight, max_lag=0.05, max_waiting=max_waiting, max_backlog=100)


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
        Admission(max_in_flight=n, max_lag=0.05, max_waiting=1, max_backlog=1)
    with pytest.raises(ValueError):
        Admission(max_in_flight=1, max_lag=0.05, max_waiting=1, max_backlog=n)
