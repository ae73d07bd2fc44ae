"""Test-only kill switch: a process SIGKILLs itself at a named point of its work.

The crash tests (tests/crash/) use it to stop a real process at the worst
moments, the ones TRADEOFFS.md reasons about ("what if we crash between the
bank call and the save?"), and then check that nothing was lost or doubled.

    GATEWAY_CRASH_POINTS="worker.after_bank:0.05,relay.after_publish:@20"

is read ONCE, when this module is first imported. Each entry is `point:spec`:

    point:P     die with probability P (0 < P <= 1) at every pass through the point
    point:@N    die at the N-th pass through the point (N >= 1) in this process

When the variable is unset or empty, crash_point() is one comparison with a
module-level None and returns: nothing is parsed, counted or drawn. A bad value
(unknown point, bad spec) makes the process print a message naming the
variable and exit with code 2 at start, like every other setting.

Before dying the process writes one line to stderr, so a supervisor can tell
which point fired:

    gateway crash point: <point> pid=<pid>

The points (one line each in the code; every one sits after something durable
happened and before it was acknowledged or answered):

    api.after_commit      gateway/payments/intake.py: answer_authorization() and
                          answer_action(), after the batch's transaction committed,
                          before the 202 is sent
    relay.after_publish   worker/relay.py: the broker confirmed a batch, the rows
                          are not yet marked published (their transaction is open)
    worker.after_bank     worker/handling.py: the bank answered with a final
                          verdict, record_outcome() has not run
    worker.after_record   worker/handling.py: record_outcome() committed, the
                          command is not yet acked

Never set it outside tests: it kills the process on purpose.
"""

from __future__ import annotations

import os
import random
import signal
import sys

ENV = "GATEWAY_CRASH_POINTS"
POINTS = frozenset({"api.after_commit", "relay.after_publish", "worker.after_bank", "worker.after_record"})


class CrashPointError(ValueError):
    """GATEWAY_CRASH_POINTS has a value the process cannot start with."""


def parse(raw: str | None) -> dict[str, tuple[str, float]] | None:
    """'a:0.1,b:@3' -> {'a': ('p', 0.1), 'b': ('nth', 3)}; None when unset or empty."""
    if raw is None or not raw.strip():
        return None
    points: dict[str, tuple[str, float]] = {}
    for entry in raw.split(","):
        if not entry.strip():
            continue
        name, sep, spec = (part.strip() for part in entry.partition(":"))
        if name not in POINTS:
            raise CrashPointError(f"{ENV}: unknown crash point {name!r} (known: {', '.join(sorted(POINTS))})")
        if not sep or not spec:
            raise CrashPointError(f"{ENV}: {name} needs ':probability' or ':@N'")
        try:
            if spec.startswith("@"):
                nth = int(spec[1:])
                if nth < 1:
                    raise ValueError
                points[name] = ("nth", nth)
            else:
                p = float(spec)
                if not 0 < p <= 1:
                    raise ValueError
                points[name] = ("p", p)
        except ValueError:
            raise CrashPointError(
                f"{ENV}: {name}:{spec} is neither a probability in (0, 1] nor @N with N >= 1"
            ) from None
    return points or None


def _load() -> dict[str, tuple[str, float]] | None:
    try:
        return parse(os.environ.get(ENV))
    except CrashPointError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_POINTS = _load()
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if GATEWAY_CRASH_POINTS says so; otherwise return at once."""
    if _POINTS is None:
        return
    spec = _POINTS.get(name)
    if spec is None:
        return
    mode, value = spec
    if mode == "nth":
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] != value:
            return
    elif random.random() >= value:
        return
    os.write(2, f"gateway crash point: {name} pid={os.getpid()}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
