"""Failed ops logins slowed per source and per name (gateway/api/ops/throttle.py), on a clock of the test's."""

from __future__ import annotations

import pytest

from gateway.api.ops import throttle
from gateway.api.ops.throttle import FORGET_AFTER, FREE_FAILURES, MAX_LOCKOUT, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_the_free_failures_lock_nothing_then_each_lockout_doubles_up_to_the_cap(clock):
    gate = LoginThrottle(clock=clock)
    for _ in range(FREE_FAILURES):
        assert gate.failed("10.0.0.1", "alice") == 0
        assert gate.wait("10.0.0.1", "alice") == 0
    lockouts = []
    for _ in range(12):
        lockouts.append(gate.failed("10.0.0.1", "alice"))
        assert gate.wait("10.0.0.1", "alice") == lockouts[-1]
        clock.now += lockouts[-1]  # waited it out
        assert gate.wait("10.0.0.1", "alice") == 0
    assert lockouts[:5] == [1, 2, 4, 8, 16] and max(lockouts) == MAX_LOCKOUT


def test_a_locked_out_name_is_refused_from_any_source_and_a_locked_out_source_for_any_name(clock):
    gate = LoginThrottle(clock=clock)
    for i in range(FREE_FAILURES + 1):
        gate.failed(f"10.0.0.{i}", "alice")  # one name, many sources
    assert gate.wait("192.0.2.7", "alice") > 0
    assert gate.wait("192.0.2.7", "bob") == 0
    for name in ("alice", "bob", "", "carol", "dave", "eve"):
        gate.failed("192.0.2.9", name)  # one source, many names
    assert gate.wait("192.0.2.9", "mallory") > 0


def test_a_good_login_clears_its_source_and_name(clock):
    gate = LoginThrottle(clock=clock)
    for _ in range(FREE_FAILURES):
        gate.failed("10.0.0.1", "alice")
    gate.succeeded("10.0.0.1", "alice")
    assert gate.failed("10.0.0.1", "alice") == 0  # counting starts again


def test_failures_are_forgotten_after_a_quiet_while(clock):
    gate = LoginThrottle(clock=clock)
    for _ in range(FREE_FAILURES):
        gate.failed("10.0.0.1", "alice")
    clock.now += FORGET_AFTER + 1
    assert gate.failed("10.0.0.1", "alice") == 0


def test_memory_is_bounded_and_the_oldest_source_goes_first(clock):
    gate = LoginThrottle(capacity=100, clock=clock)
    for _ in range(FREE_FAILURES + 1):
        gate.failed("10.9.9.9", "")
    for i in range(10_000):
        gate.failed(f"10.{i // 256 % 256}.{i % 256}.1", "")
        assert gate.tracked <= 2 * 100
    assert gate.wait("10.9.9.9", "alice") == 0  # pushed out by 10,000 newer sources


@pytest.mark.parametrize(
    ("remote", "source"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # the same host's /64
        ("::ffff:192.0.2.1", "192.0.2.1"),
        (None, "unknown"),
    ],
)
def test_a_source_is_an_address_or_an_ipv6_64(remote, source):
    assert throttle.source_of(remote) == source
