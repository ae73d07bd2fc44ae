"""worker.breaker: the circuit breaker as a pure state machine on a fake clock."""

from __future__ import annotations

import random

import pytest

from gateway.domain import BankOutcome
from worker.breaker import CircuitBreaker, Failure, Policy, State, judge

POLICY = Policy(
    window=10.0, min_operations=20, failure_ratio=0.5, unreachable_operations=5, probe_interval=1.0, trial_calls=3
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list:
    return []


@pytest.fixture
def breaker(clock, changes) -> CircuitBreaker:
    return CircuitBreaker(POLICY, clock, on_change=lambda old, new, why: changes.append((old, new, why)))


def call(breaker: CircuitBreaker, source: str, failure: Failure | None) -> bool:
    """One call for `source` if a permit is given; False if it was refused."""
    permit = breaker.acquire(source)
    if permit is None:
        return False
    breaker.record(permit, failure)
    return True


def open_it(breaker: CircuitBreaker) -> None:
    for i in range(POLICY.unreachable_operations):
        call(breaker, f"op{i}", Failure.UNREACHABLE)
    assert breaker.state is State.OPEN


# ---- judging outcomes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "failure"),
    [
        (BankOutcome("ok", 200, body={}), None),
        (BankOutcome("error", 400, code="invalid_card"), None),  # a working bank saying no
        (BankOutcome("error", 402, code="insufficient_funds"), None),
        (BankOutcome("unparseable", 400), None),  # the bank's plain-text 400
        (BankOutcome("redirect", 302), None),
        (BankOutcome("error", 500, code="internal_error"), Failure.ERROR),
        (BankOutcome("unparseable", 502), Failure.ERROR),  # a proxy's HTML page
        (BankOutcome("unparseable", 503), Failure.ERROR),
        (BankOutcome("timeout"), Failure.UNREACHABLE),
        (BankOutcome("connection"), Failure.UNREACHABLE),
        (BankOutcome("unreachable"), Failure.UNREACHABLE),
    ],
)
def test_judge(outcome, failure):
    assert judge(outcome) is failure


# ---- opening -----------------------------------------------------------------------------------------


def test_starts_closed_and_lets_calls_through(breaker):
    assert breaker.state is State.CLOSED and not breaker.is_open
    assert breaker.acquire("op") is not None
    assert breaker.probe_wait() is None


def test_distinct_operations_that_cannot_reach_the_bank_open_it(breaker, changes):
    for i in range(POLICY.unreachable_operations - 1):
        call(breaker, f"op{i}", Failure.UNREACHABLE)
    assert breaker.state is State.CLOSED
    call(breaker, "op-last", Failure.UNREACHABLE)
    assert breaker.state is State.OPEN and breaker.is_open and breaker.times_opened == 1
    assert breaker.acquire("op-new") is None
    ((old, new, why),) = changes
    assert (old, new) == (State.CLOSED, State.OPEN) and "could not reach the bank" in why


def test_one_operation_failing_again_and_again_never_opens_it(breaker):
    for _ in range(500):
        call(breaker, "poison", Failure.UNREACHABLE)
        call(breaker, "poison", Failure.ERROR)
    assert breaker.state is State.CLOSED


def test_an_answer_in_between_resets_the_unreachable_streak(breaker):
    for round_ in range(50):
        for i in range(POLICY.unreachable_operations):  # answers, and enough to stay under the ratio
            call(breaker, f"ok{round_}-{i}", None)
        for i in range(POLICY.unreachable_operations - 1):
            call(breaker, f"op{round_}-{i}", Failure.UNREACHABLE)
    assert breaker.state is State.CLOSED


def test_a_5xx_answer_is_an_answer_for_the_streak_but_a_failure_for_the_ratio(breaker, clock):
    for i in range(POLICY.unreachable_operations - 1):
        call(breaker, f"u{i}", Failure.UNREACHABLE)
    call(breaker, "e", Failure.ERROR)
    call(breaker, "u-last", Failure.UNREACHABLE)
    assert breaker.state is State.CLOSED  # the 500 broke the streak


def test_failure_ratio_needs_enough_operations(breaker):
    for i in range(POLICY.min_operations - 1):
        call(breaker, f"op{i}", Failure.ERROR)
    assert breaker.state is State.CLOSED  # 19 operations, all failed: not enough to judge
    call(breaker, "op-20", Failure.ERROR)
    assert breaker.state is State.OPEN


def test_failure_ratio_threshold(breaker):
    # 60 operations: 29 failures is under half, the 30th reaches it.
    for i in range(31):
        call(breaker, f"good{i}", None)
    for i in range(29):
        call(breaker, f"bad{i}", Failure.ERROR)
    assert breaker.state is State.CLOSED
    for i in range(2):
        call(breaker, f"more-bad{i}", Failure.ERROR)
    assert breaker.state is State.OPEN


def test_each_operation_counts_once_with_its_latest_result(breaker):
    for i in range(30):
        call(breaker, f"op{i}", None)
    for _ in range(100):  # one operation retried many times does not swing the ratio
        call(breaker, "op0", Failure.ERROR)
    assert breaker.state is State.CLOSED
    for i in range(30):
        call(breaker, f"op{i}", Failure.ERROR)  # but 30 operations whose latest try failed do
    assert breaker.state is State.OPEN


def test_results_older_than_the_window_are_forgotten(breaker, clock):
    for i in range(19):
        call(breaker, f"old{i}", Failure.ERROR)
    clock.now += POLICY.window + 0.1
    for i in range(19):
        call(breaker, f"new{i}", None)
    call(breaker, "new-bad", Failure.ERROR)
    assert breaker.state is State.CLOSED  # 1 of 20 recent failed, the old 19 are gone


def test_the_banks_usual_5_percent_never_opens_it(breaker, clock):
    """Thousands of calls at the mock bank's default FAILURE_RATE (5% 500s), at different
    rates of traffic, with retries of the failed operations: never open."""
    rng = random.Random(20240605)
    opened = []
    breaker._on_change = lambda old, new, why: opened.append(why)
    operation = 0
    for calls_per_second in (2, 20, 200, 2000):
        for _ in range(3000):
            clock.now += 1 / calls_per_second
            operation += 1
            source = f"op{operation}"
            failed = rng.random() < 0.05
            assert call(breaker, source, Failure.ERROR if failed else None)
            if failed:  # the operation's quick retry
                call(breaker, source, Failure.ERROR if rng.random() < 0.05 else None)
    assert opened == [] and breaker.state is State.CLOSED


def test_a_bank_that_is_down_opens_it_at_low_traffic_too(breaker, clock):
    for i in range(POLICY.unreachable_operations):
        clock.now += 30  # one new operation every 30 s: the window never holds 20
        call(breaker, f"op{i}", Failure.UNREACHABLE)
    assert breaker.state is State.OPEN


# ---- open: probing -----------------------------------------------------------------------------------


def test_open_asks_for_a_probe_every_interval(breaker, clock):
    open_it(breaker)
    assert breaker.probe_wait() == pytest.approx(1.0)
    clock.now += 0.4
    assert breaker.probe_wait() == pytest.approx(0.6)
    clock.now += 0.6
    assert breaker.probe_wait() == pytest.approx(0.0)
    breaker.probed(False)
    assert breaker.state is State.OPEN and breaker.probe_wait() == pytest.approx(1.0)
    assert breaker.acquire("x") is None


def test_healthy_probe_half_opens_with_a_few_trial_calls(breaker, clock, changes):
    open_it(breaker)
    clock.now += 1
    breaker.probed(True)
    assert breaker.state is State.HALF_OPEN and breaker.is_open
    permits = [breaker.acquire(f"t{i}") for i in range(POLICY.trial_calls)]
    assert all(p is not None and p.trial for p in permits)
    assert breaker.acquire("one-too-many") is None
    for p in permits:
        breaker.record(p, None)
    assert breaker.state is State.CLOSED and not breaker.is_open
    assert [new for _, new, _ in changes] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_failed_trial_opens_it_again(breaker, clock):
    open_it(breaker)
    breaker.probed(True)
    first, second = breaker.acquire("a"), breaker.acquire("b")
    breaker.record(first, None)
    breaker.record(second, Failure.UNREACHABLE)
    assert breaker.state is State.OPEN and breaker.times_opened == 2
    assert breaker.probe_wait() == pytest.approx(1.0)


def test_a_cancelled_trial_frees_its_slot(breaker):
    open_it(breaker)
    breaker.probed(True)
    permits = [breaker.acquire(f"t{i}") for i in range(POLICY.trial_calls)]
    assert breaker.acquire("waiting") is None
    breaker.cancel(permits[0])
    assert breaker.acquire("waiting") is not None


def test_trip_opens_it_from_any_state(breaker, changes):
    breaker.trip("health check failed")
    assert breaker.state is State.OPEN and breaker.times_opened == 1
    breaker.trip("again")
    assert breaker.times_opened == 1  # already open
    breaker.probed(True)
    breaker.trip("a trial found it down")
    assert breaker.state is State.OPEN and breaker.times_opened == 2
    assert [why for _, _, why in changes][0] == "health check failed"


def test_probe_results_outside_open_are_ignored(breaker):
    breaker.probed(False)
    assert breaker.state is State.CLOSED
    open_it(breaker)
    breaker.probed(True)
    breaker.probed(False)
    assert breaker.state is State.HALF_OPEN


def test_results_of_calls_started_before_a_change_do_not_count(breaker, clock):
    in_flight = [breaker.acquire(f"slow{i}") for i in range(10)]  # started while closed
    open_it(breaker)
    breaker.probed(True)
    for p in in_flight:
        breaker.record(p, Failure.UNREACHABLE)  # their timeouts arrive during the trials
    assert breaker.state is State.HALF_OPEN
    for i in range(POLICY.trial_calls):
        call(breaker, f"trial{i}", None)
    assert breaker.state is State.CLOSED
    late = breaker.acquire("late")
    open_it(breaker)
    breaker.cancel(late)  # a stale cancel does not free a trial slot that is not its own
    breaker.probed(True)
    assert [breaker.acquire(f"t{i}") is not None for i in range(POLICY.trial_calls + 1)] == [True] * 3 + [False]


def test_closing_starts_with_a_clean_window(breaker, clock):
    for i in range(19):
        call(breaker, f"pre{i}", Failure.ERROR)
    open_it(breaker)
    breaker.probed(True)
    for i in range(POLICY.trial_calls):
        call(breaker, f"trial{i}", None)
    call(breaker, "after", Failure.ERROR)
    assert breaker.state is State.CLOSED  # the 19 earlier failures were forgotten
