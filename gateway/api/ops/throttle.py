"""Failed logins to the ops console: slowed per source address and per user name.

Each source (an IPv4 address, an IPv6 /64: one host has a whole /64 to pick from) and
each operator's name (all names that are not an operator's count as one) may fail
FREE_FAILURES times; every failure after that locks it out for twice as long as the one
before (1 s, 2 s, 4 s... at most MAX_LOCKOUT). While a source or a name is locked out, a
login from it or for it is refused (429, Retry-After) without its key being looked at:
guessing gets no faster from many addresses against one name, nor from one address
against many names. A login that succeeds clears its source and its name; failures are
forgotten FORGET_AFTER after the last one.

The price of the per-name lockout: someone who knows an operator's name can keep them
out of the console (not out of gatewayctl) for MAX_LOCKOUT at a time. The source is the
connection's address (forwarding headers are not believed): behind a proxy, or through a
tunnel to a loopback listener, every operator shares one source and its lockouts. With keys of 128
random bits the lockouts do not protect the keys, they make guessing loud and slow.

Memory is bounded: the names are the operators' (and one for the rest), and the sources
are the MAX_TRACKED that failed most recently; beyond that the oldest is forgotten, which
an attacker could force only by failing from more than MAX_TRACKED sources.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 5
MAX_LOCKOUT = 300.0  # seconds
FORGET_AFTER = 900.0  # seconds after the last failure
MAX_TRACKED = 10_000
_MAX_DOUBLINGS = 16  # 2**16 s is past MAX_LOCKOUT already; the count itself may grow on


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class _Table:
    """Failures by key, the most recently failed last; at most `capacity` keys."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def locked_for(self, key: str, now: float) -> float:
        entry = self._entries.get(key)
        return max(0.0, entry.locked_until - now) if entry is not None else 0.0

    def failed(self, key: str, now: float) -> float:
        """Count a failure; returns the lockout it starts (0: none)."""
        entry = self._entries.pop(key, None)
        if entry is None or now - entry.last > FORGET_AFTER:
            entry = _Failures()
        entry.count += 1
        entry.last = now
        if entry.count > FREE_FAILURES:
            doublings = min(entry.count - FREE_FAILURES - 1, _MAX_DOUBLINGS)
            entry.locked_until = now + min(MAX_LOCKOUT, 2.0**doublings)
        self._entries[key] = entry
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return max(0.0, entry.locked_until - now)

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)


def source_of(remote: str | None) -> str:
    """The source a failure is counted against: the address, an IPv6 one as its /64."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "unknown"  # a unix socket: one source
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginThrottle:
    def __init__(self, *, capacity: int = MAX_TRACKED, clock: Callable[[], float] = time.monotonic):
        self._sources = _Table(capacity)
        self._users = _Table(capacity)
        self._clock = clock

    def wait(self, source: str, user: str) -> float:
        """Seconds until a login from `source` for `user` may be tried (0: now)."""
        now = self._clock()
        return max(self._sources.locked_for(source, now), self._users.locked_for(user, now))

    def failed(self, source: str, user: str) -> float:
        """Count a failed login; returns the lockout it starts (0: none)."""
        now = self._clock()
        return max(self._sources.failed(source, now), self._users.failed(user, now))

    def succeeded(self, source: str, user: str) -> None:
        self._sources.clear(source)
        self._users.clear(user)

    @property
    def tracked(self) -> int:
        """Sources and names remembered (each table bounded by the capacity)."""
        return len(self._sources) + len(self._users)
