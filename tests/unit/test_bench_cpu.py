"""bench/system.py's CPU accounting: what a figure per part is made of, and when there is none."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from bench.system import CostUnknown, Snapshot
from bench.util import ProcStat, listening_pid, proc_stat


def stat(pid: int, user: float, system: float = 0.0, started: int = 100) -> ProcStat:
    return ProcStat(pid=pid, started=started, ppid=1, user=user, system=system)


def test_a_part_sums_its_processes_and_counts_one_started_meanwhile_in_full():
    before, after = Snapshot(at=0.0), Snapshot(at=1.0)
    before.add("postgres", stat(10, 1.0, 0.5))
    after.add("postgres", stat(10, 1.5, 0.75))
    after.add("postgres", stat(11, 0.25, 0.25))  # a backend connected during the window
    assert after.cpu_delta(before) == {"postgres": pytest.approx(0.75 + 0.5)}
    assert after.sys_delta(before) == {"postgres": pytest.approx(0.25 + 0.25)}


@pytest.mark.parametrize(
    "later",
    [None, stat(10, 9.0, started=200)],  # ended; its pid reused by another process
    ids=["ended", "pid reused"],
)
def test_a_process_that_ended_or_was_replaced_leaves_no_figure(later):
    # Summing what is left would make the part's CPU too small, even negative (RabbitMQ's
    # figure once was: a rabbitmqctl's beam.smp counted before, gone after).
    before, after = Snapshot(at=0.0), Snapshot(at=1.0)
    before.add("rabbitmq", stat(10, 5.0))
    after.add("rabbitmq", later)
    with pytest.raises(CostUnknown, match="rabbitmq"):
        after.cpu_delta(before)


def test_an_autovacuum_worker_may_end():
    before, after = Snapshot(at=0.0), Snapshot(at=1.0)
    before.add("postgres", stat(10, 1.0))
    before.add("postgres", stat(12, 3.0), may_end=True)
    after.add("postgres", stat(10, 2.0))
    assert after.cpu_delta(before) == {"postgres": pytest.approx(1.0)}


def test_proc_stat_reads_this_process():
    mine = proc_stat(os.getpid())
    assert mine is not None and mine.pid == os.getpid() and mine.ppid == os.getppid()
    assert mine.user + mine.system > 0


async def test_listening_pid_names_the_process_that_listens_on_the_port():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await asyncio.to_thread(listening_pid, port) == os.getpid()
    finally:
        server.close()
        await server.wait_closed()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening
        with pytest.raises(RuntimeError, match="listens on port"):
            listening_pid(unused.getsockname()[1])
