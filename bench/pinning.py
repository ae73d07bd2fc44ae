"""`make bench --pin-api`: the API and the load generator on one CPU, everything else on the others.

On one machine the pipeline (worker, relay, PostgreSQL, RabbitMQ) running at capacity takes every
core, and the API then cannot answer even its refusals quickly. Deployed, the API has CPU of its
own; this shows what load shedding does when it has. Affinity is set on every thread (RabbitMQ's
schedulers are threads) and on the PostgreSQL postmaster, whose new backends inherit it; all of
them get every CPU back afterwards, failure included. The shared PostgreSQL and RabbitMQ are
pinned too: other work on this machine is slowed while it runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from bench.system import BenchSystem
from bench.util import pids_by_comm


def _pin(pids: Iterable[int | None], cpus: set[int]) -> None:
    for pid in pids:
        if pid is None:
            continue
        try:
            threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # gone
        for tid in threads:
            with contextlib.suppress(OSError):  # a thread that ended since
                os.sched_setaffinity(tid, cpus)


def _back_end(system: BenchSystem) -> list[int | None]:
    """Every process but the API's and ours: read afresh (PostgreSQL starts backends as it goes)."""
    gateway = [system.pid(name) for name in system.names() if system.kind[name] != "api"]
    return [*gateway, *pids_by_comm("postgres"), system.broker_pid]


@contextlib.contextmanager
def api_alone(system: BenchSystem) -> Iterator[str]:
    """Pin for the duration of the block; yields a line saying how."""
    every = os.sched_getaffinity(0)
    if len(every) < 2:
        raise SystemExit(f"--pin-api needs at least two CPUs (this process may use {sorted(every)})")
    front = {min(every)}
    back = every - front
    api = [system.pid(name) for name in system.names("api")]
    try:
        _pin([*api, os.getpid()], front)
        _pin(_back_end(system), back)
        yield f"api and load generator on CPU {sorted(front)}, the rest on CPU {sorted(back)}"
    finally:
        _pin([*api, os.getpid(), *_back_end(system)], every)
