"""Admission decisions (gateway/api/admission.py) on a fake clock, and the refusal log line,
without a server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from gateway.api import middleware
from gateway.api.admission import Admission, CompletionRate, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(
    max_in_flight: int = 4,
    max_long_polls: int = 2,
    *,
    post_rate: float = 10**6,
    post_rates: dict[str, float] | None = None,
    clock: Clock | None = None,
) -> Admission:
    return Admission(
        max_in_flight=max_in_flight,
        max_long_polls=max_long_polls,
        max_time_to_final=30.0,
        post_rate=post_rate,
        post_rates=post_rates,
        clock=clock or Clock(),
    )


@contextlib.contextmanager
def working(gate: Admission, caller: str) -> Iterator[None]:
    gate.requests.add(caller, 1)
    try:
        yield
    finally:
        gate.requests.add(caller, -1)


def run_at(gate: Admission, clock: Clock, rate: float, backlog: int, seconds: float) -> int:
    """Probes every 0.25 s for `seconds` while the gateway finishes `rate` payments a second
    and `backlog` operations wait; returns the finished count it reached."""
    finished = getattr(gate, "_test_finished", 0)
    for _ in range(int(seconds / 0.25)):
        clock.now += 0.25
        finished += int(rate * 0.25)
        gate.observe(backlog, finished)
    gate._test_finished = finished  # type: ignore[attr-defined]
    return finished


def test_admits_below_the_memory_bound_and_refuses_a_lone_caller_at_it():
    gate = admission(max_in_flight=2)
    with contextlib.ExitStack() as held:
        assert gate.refusal("a", adds_work=True) is None
        held.enter_context(working(gate, "a"))
        assert gate.refusal("a", adds_work=False) is None
        held.enter_context(working(gate, "a"))
        refusal = gate.refusal("a", adds_work=False)
        assert refusal is not None and (refusal.status, refusal.code, refusal.reason) == (
            503,
            "service_unavailable",
            "overload",
        )
    assert gate.in_flight == 0 and gate.refusal("a", adds_work=True) is None


def test_at_the_memory_bound_the_caller_holding_its_share_gets_429_and_the_other_keeps_its_room():
    gate = admission(max_in_flight=4)
    with contextlib.ExitStack() as held:
        for _ in range(4):
            held.enter_context(working(gate, "greedy"))
        alone = gate.refusal("greedy", adds_work=True)
        assert alone is not None and alone.status == 503  # nobody else wants room: the gateway is full
        assert gate.refusal("quiet", adds_work=True) is None  # its share is 2 of the 4
        held.enter_context(working(gate, "quiet"))
        greedy = gate.refusal("greedy", adds_work=True)
        assert greedy is not None and (greedy.status, greedy.reason) == (429, "caller_share")
        assert gate.refusal("quiet", adds_work=True) is None
        held.enter_context(working(gate, "quiet"))
        quiet = gate.refusal("quiet", adds_work=True)
        assert quiet is not None and quiet.status == 429
        assert gate.in_flight == 6  # past max_in_flight by less than max_in_flight


def test_a_burst_on_an_idle_gateway_is_absorbed_up_to_the_in_flight_bound_before_any_rate_is_known():
    clock = Clock()
    gate = admission(max_in_flight=2000, clock=clock)
    gate.observe(1999, 0)  # 1999 operations accepted at once: nothing finished yet, no rate
    assert gate.rate.per_second is None
    assert gate.refusal("a", adds_work=True) is None
    gate.observe(2000, 0)
    refused = gate.refusal("a", adds_work=True)
    assert refused is not None and refused.reason == "backlog"


def test_a_burst_the_gateway_finishes_within_the_bound_is_absorbed():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=50, seconds=5)
    assert gate.rate.per_second == pytest.approx(200)
    # 5000 waiting at 200/s: 25 s to final, within 30 s.
    gate.observe(5000, run_at(gate, clock, rate=200, backlog=5000, seconds=0.25))
    assert gate.refusal("a", adds_work=True) is None


def test_idle_time_does_not_dilute_the_completion_rate():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=10, seconds=2)
    run_at(gate, clock, rate=200, backlog=0, seconds=0.25)  # the last of it finishes
    before = gate.rate.per_second
    assert before == pytest.approx(200)
    run_at(gate, clock, rate=0, backlog=0, seconds=60)  # a quiet minute
    assert gate.rate.per_second == before


def test_standing_overload_is_shed_with_a_retry_after_that_says_when_there_is_room():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=7000, seconds=5)  # 35 s to final at 200/s
    refused = gate.refusal("a", adds_work=True)
    assert refused is not None and (refused.status, refused.code, refused.reason) == (
        503,
        "service_unavailable",
        "backlog",
    )
    assert refused.retry_after == 6  # (7000 - 6000 + 1) / 200, rounded up
    assert gate.refusal("a", adds_work=False) is None  # reads are served
    run_at(gate, clock, rate=200, backlog=6400, seconds=0.25)
    refused = gate.refusal("a", adds_work=True)
    assert refused is not None and refused.retry_after == 3  # less to wait for now


def test_recovery_once_the_backlog_drains_below_the_bound():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=7000, seconds=5)
    assert gate.refusal("a", adds_work=True) is not None
    run_at(gate, clock, rate=200, backlog=5999, seconds=0.25)
    assert gate.refusal("a", adds_work=True) is None


def offer(gate: Admission, clock: Clock, *, offered: float, rate: float, seconds: float) -> int:
    """New work offered at `offered`/s while `rate`/s finish: the backlog grows by what is
    admitted and shrinks by what finishes (probed every 0.25 s); returns the admitted count."""
    admitted, finished, backlog = 0, getattr(gate, "_test_finished", 0), gate.backlog
    for _ in range(int(seconds / 0.25)):
        for _ in range(int(offered * 0.25)):
            if gate.refusal("a", adds_work=True) is None:
                admitted += 1
                backlog += 1
        clock.now += 0.25
        done = min(backlog, int(rate * 0.25))
        backlog, finished = backlog - done, finished + done
        gate.observe(backlog, finished)
    gate._test_finished = finished  # type: ignore[attr-defined]
    return admitted


def test_past_the_cushion_a_standing_overload_is_paced_to_the_completion_rate():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=150, seconds=5)  # 200/s; the 30 s bound is 6000
    admitted = offer(gate, clock, offered=600, rate=200, seconds=20)
    # a burst of 5 s at 220/s, then 220/s: far from the 12,000 offered, and from the bound
    assert 20 * 200 <= admitted <= 5 * 220 + 20 * 220 + 100
    assert gate.backlog < gate.backlog_bound()
    # what the last quarter second finished may be taken again, and no more
    refusals = [gate.refusal("a", adds_work=True) for _ in range(60)]
    taken = refusals.index(next(r for r in refusals if r is not None))
    assert taken <= 0.25 * 220 + 1
    refused = refusals[taken]
    assert refused is not None and (refused.status, refused.reason, refused.retry_after) == (503, "backlog", 1)
    assert gate.refusal("a", adds_work=False) is None  # reads are served


def test_a_standing_overload_stays_paced_when_its_backlog_dips_below_the_bound_and_the_cushion():
    # The bench's overload showed a sawtooth: while everything was refused for the bound, the
    # pace refilled to 5 s of its rate, and each dip below the bound (or the cushion) let that
    # in at the offered rate, a burst the API answered hundreds of ms late.
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=150, seconds=5)
    offer(gate, clock, offered=600, rate=200, seconds=10)  # paced by now
    run_at(gate, clock, rate=200, backlog=7000, seconds=3)  # the workers fell behind: past the bound
    assert gate.refusal("a", adds_work=True) is not None
    run_at(gate, clock, rate=200, backlog=50, seconds=0.25)  # they caught up: under the cushion
    admitted = offer(gate, clock, offered=600, rate=200, seconds=2)
    assert 2 * 200 <= admitted <= 2.25 * 220 + 5  # at the pace, not 1,200 at the offered rate
    # Once new work comes no faster than the pace for BURST_SECONDS, a burst is absorbed again.
    offer(gate, clock, offered=100, rate=200, seconds=6)
    assert offer(gate, clock, offered=400, rate=200, seconds=0.25) == 100


def test_below_the_cushion_a_burst_is_not_paced():
    clock = Clock()
    gate = admission(max_in_flight=2000, clock=clock)
    run_at(gate, clock, rate=200, backlog=10, seconds=5)
    assert offer(gate, clock, offered=7996, rate=200, seconds=0.25) == 1999  # the cushion, at once
    assert offer(gate, clock, offered=400, rate=200, seconds=10) <= 5 * 220 + 10 * 220 + 100


def test_a_stalled_pipeline_is_bounded_by_the_in_flight_floor_and_a_slower_one_by_its_rate():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=0, backlog=99, seconds=2)  # work waits, nothing finishes
    assert gate.rate.per_second == 0 and gate.refusal("a", adds_work=True) is None
    gate.observe(100, 0)
    assert gate.refusal("a", adds_work=True) is not None
    run_at(gate, clock, rate=4, backlog=100, seconds=10)  # 4/s: 120 waiting would take 30 s
    assert gate.backlog_bound() == 120


def test_without_wake_ups_the_rate_is_forgotten_and_the_floor_applies():
    clock = Clock()
    gate = admission(max_in_flight=100, clock=clock)
    run_at(gate, clock, rate=200, backlog=3000, seconds=5)
    assert gate.refusal("a", adds_work=True) is None
    gate.observe(3000, None)  # the LISTEN connection is down: wake-ups may be missed
    assert gate.rate.per_second is None
    assert gate.refusal("a", adds_work=True) is not None


def test_the_completion_rate_covers_the_last_window_of_work_only():
    rate = CompletionRate(window=2.0)
    rate.sample(0.0, 0, busy=True)
    for second in range(1, 11):
        rate.sample(float(second), second * 100, busy=True)  # 100/s for 10 s
    for second in range(11, 13):
        rate.sample(float(second), 1000 + (second - 10) * 10, busy=True)  # then 10/s for 2 s
    assert rate.per_second == pytest.approx(10)


def test_the_token_bucket_takes_a_burst_of_five_seconds_then_refuses_with_429_and_refills():
    clock = Clock()
    gate = admission(max_in_flight=100, post_rate=2, post_rates={"big": 100}, clock=clock)
    for _ in range(10):  # 5 s of 2/s
        assert gate.refusal("a", adds_work=True) is None
    refused = gate.refusal("a", adds_work=True)
    assert refused is not None and (refused.status, refused.code, refused.reason) == (
        429,
        "too_many_requests",
        "rate",
    )
    assert refused.retry_after == 1
    assert gate.refusal("a", adds_work=False) is None  # reads are not counted
    assert gate.refusal("b", adds_work=True) is None  # another caller has its own bucket
    for _ in range(500):
        assert gate.refusal("big", adds_work=True) is None  # its own, larger rate
    clock.now += 0.5
    assert gate.refusal("a", adds_work=True) is None
    assert gate.refusal("a", adds_work=True) is not None


def test_new_work_refused_for_the_backlog_does_not_spend_a_token():
    clock = Clock()
    gate = admission(max_in_flight=100, post_rate=1, clock=clock)
    gate.observe(100, None)
    for _ in range(20):
        refused = gate.refusal("a", adds_work=True)
        assert refused is not None and refused.reason == "backlog"
    gate.observe(0, None)
    for _ in range(5):
        assert gate.refusal("a", adds_work=True) is None


def test_a_parked_long_poll_is_not_in_flight_while_it_waits_and_is_again_after():
    gate = admission(max_in_flight=1, max_long_polls=1)
    with working(gate, "a"):
        with gate.parked("a"):
            assert gate.in_flight == 0 and gate.waiting == 1
            assert gate.refusal("a", adds_work=True) is None
            refusal = gate.wait_refusal("a")
            assert refusal is not None and (refusal.status, refusal.reason) == (503, "long_polls")
        assert gate.in_flight == 1 and gate.waiting == 0
        assert gate.wait_refusal("a") is None
    assert gate.in_flight == 0


def test_one_caller_cannot_take_another_callers_room_among_the_long_polls():
    gate = admission(max_in_flight=10, max_long_polls=4)
    with contextlib.ExitStack() as held:
        for _ in range(3):
            assert gate.wait_refusal("greedy") is None
            held.enter_context(working(gate, "greedy"))
            held.enter_context(gate.parked("greedy"))
        assert gate.wait_refusal("greedy") is None  # alone, it may use all of them
        assert gate.wait_refusal("quiet") is None
        held.enter_context(working(gate, "quiet"))
        held.enter_context(gate.parked("quiet"))
        greedy = gate.wait_refusal("greedy")  # 3 of 4 held among 2 callers: past its share
        assert greedy is not None and (greedy.status, greedy.reason) == (429, "long_polls")


def test_an_admitted_request_holds_room_until_released_and_a_refused_one_holds_none():
    gate = admission(max_in_flight=1)
    assert gate.admit("a", adds_work=True) is None
    assert gate.in_flight == 1
    refused = gate.admit("a", adds_work=True)
    assert refused is not None and refused.reason == "overload"
    assert gate.in_flight == 1
    gate.release("a")
    assert gate.in_flight == 0


async def test_the_probe_asks_up_to_the_bound_and_keeps_the_last_count_when_the_database_fails():
    asked = []
    answers = iter([7, OSError("down")])

    async def count(most: int) -> int:
        asked.append(most)
        answer = next(answers, 9)
        if isinstance(answer, Exception):
            raise answer
        return answer

    gate = Admission(max_in_flight=100, max_long_polls=1, max_time_to_final=30, post_rate=1)
    gate.start(count, lambda: 0)
    try:
        await asyncio.sleep(0.01)
        assert gate.backlog == 7
        await asyncio.sleep(0.3)  # the second probe failed: still 7
        assert gate.backlog == 7 and len(asked) == 2
        await asyncio.sleep(0.3)
        assert gate.backlog == 9
    finally:
        await gate.close()
    assert set(asked) == {101}  # nothing finished: the bound is the in-flight floor


@pytest.mark.parametrize(
    "limits",
    [
        {"max_in_flight": 0},
        {"max_long_polls": 0},
        {"max_time_to_final": 0},
        {"post_rate": -1},
        {"post_rates": {"a": 0}},
    ],
)
def test_refuses_nonsense_limits(limits):
    with pytest.raises(ValueError):
        Admission(**{"max_in_flight": 1, "max_long_polls": 1, "max_time_to_final": 30, "post_rate": 1, **limits})


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
    for reason in ("rate", "rate", "backlog"):
        refusals.add(reason)
    assert recorder.lines == []  # nothing yet: one line when the period is over
    await asyncio.sleep(0.1)
    assert recorder.lines == [("requests refused for load", {"seconds": 0.05, "rate": 2, "backlog": 1})]
    refusals.add("overload")
    refusals.flush()  # at shutdown: at once, and the pending line is not written twice
    await asyncio.sleep(0.1)
    assert recorder.lines[1:] == [("requests refused for load", {"seconds": 0.05, "overload": 1})]


def test_a_bucket_kept_to_a_few_seconds_counts_the_time_since_its_last_refill():
    bucket = TokenBucket(100, now=0.0)  # full: 5 s of 100/s
    for _ in range(500):
        assert bucket.take(0.0) == 0
    bucket.keep_at_most(0.25, now=10.0)  # 10 s refilled first, then 0.25 s of it kept
    taken = sum(1 for _ in range(100) if bucket.take(10.0) == 0)
    assert taken == 25
