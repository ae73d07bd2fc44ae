"""Drills on a RabbitMQ cluster and a PostgreSQL failover formation (scripts/ha/ha.sh), under load.

Two of every gateway process (API, relay, worker) run against the three broker nodes
(AMQP_URL lists them) and the formation (a multi-host DATABASE_URL with
target_session_attrs=read-write). FicMart's flows (authorize, then capture / void / refund)
start at a steady rate while, one after the other:
  - the broker node that leads payments.work is SIGKILLed, and brought back later;
  - the database primary's postmaster is SIGKILLed (its keeper restarts it: crash recovery);
  - the database primary's host is lost: its keeper, postmaster and backends SIGKILLed
    (pg_auto_failover promotes the standby), then the host comes back as the new standby;
  - a planned failover (`pg_autoctl perform failover`).
No gateway process is restarted by hand: a process that dies fails the drill. At the end the
crash audit (tests/crash, tests/e2e/flows.py) asserts nothing lost, doubled or stuck against the
mock bank's books, that flows never stopped completing for more than 60 s after a fault's end,
and every flow done within 60 s of the last fault's end. For each fault the drill prints how
long acceptance (202s from the API) and completion (flows finishing) stopped.

The soak runs 10,000 lifecycles across repeated broker-node kills and database failovers
with the mock bank's forgetful-key switch on.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.crash.harness import BANK_CHAOS, FORGETFUL_BANK, _findings
from tests.e2e.flows import Flow, audit, plans, run_flow, wait_for_events
from tests.e2e.stack import Client, Stack
from tests.ha import census
from tests.ha.engines import Engines

pytestmark = [pytest.mark.long, pytest.mark.timeout(7200)]

SETTLE_AFTER_FAULT = 60.0

# The issue asks for 100 authorizations/s; a shared or small machine may not sustain that with
# two of every process, so the rate and the count can be lowered (the figures printed say which).
DRILL_RATE = float(os.environ.get("HA_DRILL_RATE", "100"))
DRILL_PAYMENTS = int(os.environ.get("HA_DRILL_PAYMENTS", "18000"))
SOAK_RATE = float(os.environ.get("HA_SOAK_RATE", "50"))


@dataclass
class Fault:
    name: str
    started: float
    ended: float = 0.0


@dataclass
class Timeline:
    accepted: list[float] = field(default_factory=list)  # each flow's authorize answered 202
    completed: list[float] = field(default_factory=list)  # each flow done

    @staticmethod
    def stopped(times: list[float], fault: Fault, next_fault: float = float("inf")) -> float:
        """The longest pause in `times` that overlaps the fault or the 60 s after it (cut at
        the next fault's start): from the last time before the fault to the first time after
        that window, the gaps between them."""
        ordered = sorted(times)
        start = bisect.bisect_left(ordered, fault.started) - 1
        end = bisect.bisect_right(ordered, min(fault.ended + SETTLE_AFTER_FAULT, next_fault)) + 1
        window = ordered[max(start, 0) : end]
        return max((b - a for a, b in zip(window, window[1:], strict=False)), default=float("inf"))


async def _paced_flows(stack: Stack, todo, rate: float, timeline: Timeline, cap: int) -> list[Flow]:
    """FicMart's flows, started `rate` a second, spread over every API process in turn (as a
    load balancer would), at most `cap` at once."""
    assert stack.http is not None
    clients = [Client(url, stack.http, patience=300) for url in stack.api_urls]
    for client in clients:
        client.authorize = _timed(client.authorize, timeline)  # type: ignore[method-assign]
    run_id = uuid.uuid4().hex[:8]
    sem = asyncio.Semaphore(cap)
    start = time.monotonic()

    async def one(i: int, plan) -> Flow:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        async with sem:
            flow = await run_flow(clients[i % len(clients)], plan, run_id, settle_timeout=300)
        timeline.completed.append(time.monotonic())
        return flow

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(todo))))


def _timed(authorize, timeline: Timeline):
    """`authorize` noting in the timeline when it was answered 202."""

    async def timed(**kwargs):
        reply = await authorize(**kwargs)
        if reply.status == 202:
            timeline.accepted.append(time.monotonic())
        return reply

    return timed


async def _drill(
    ha: Engines,
    card_key: str,
    *,
    payments: int,
    rate: float,
    faults: list[str],
    forgetful: bool,
    log_dir: Path,
) -> None:
    stack = Stack(
        ha.server_urls,
        card_key,
        bank_env={**BANK_CHAOS, **(FORGETFUL_BANK if forgetful else {})},
        gateway_env={"LOG_LEVEL": "info"},
        event_queue="ha-drill.events",
        scale={"api": 2, "relay": 2, "worker": 2},
        log_dir=log_dir,
    )
    print(f"\nthe processes' logs: {log_dir}")
    timeline = Timeline()
    done: list[Fault] = []
    traffic: asyncio.Task | None = None
    try:
        # A fault on a cluster already short of a node (one a run before left down) measures
        # nothing the drill means to: two nodes of three lost, quorum queues stop.
        assert await asyncio.to_thread(ha.running_rabbits) == {1, 2, 3}, "a RabbitMQ node is down before the drill"
        await ha.formation_healthy()
        await stack.start()
        assert stack.vhost is not None
        cards = await stack.extra_cards(40)
        todo = plans(payments, cards, seed=22)
        began = time.monotonic()
        traffic = asyncio.create_task(_paced_flows(stack, todo, rate, timeline, cap=int(rate * 10)))
        duration = payments / rate
        for number, name in enumerate(faults, 1):  # spread over the traffic
            await asyncio.sleep(max(0.0, began + duration * number / (len(faults) + 1) - time.monotonic()))
            fault = Fault(name, time.monotonic())
            await _inflict(ha, stack, name)
            fault.ended = time.monotonic()
            done.append(fault)
            _check_no_deaths(stack)
        flows = await traffic
        last_fault_end = max(f.ended for f in done)
        assert max(timeline.completed) <= max(last_fault_end + SETTLE_AFTER_FAULT, max(timeline.accepted) + 60), (
            "flows still finishing more than 60 s after the last fault"
        )
        backlog = await stack.quiescent(timeout=SETTLE_AFTER_FAULT)
        client = stack.client(patience=120)
        await wait_for_events(stack.events, client, flows)
        _check_no_deaths(stack)
        ledger = await stack.bank.ledger()
        findings = await _findings(stack)
        result = await audit(
            client,
            flows,
            ledger,
            stack.events,
            backlog.get("unsent", -1),
            allow_parked=True,
            bank_forgets_keys=forgetful,
            findings=findings,
        )
        _write_timeline(log_dir / "timeline.txt", began, timeline, done)
        print("\n" + census.report(stack, payments))
        pauses = []
        for fault, after in zip(done, [f.started for f in done[1:]] + [float("inf")], strict=True):
            accepting = Timeline.stopped(timeline.accepted, fault, after)
            completing = Timeline.stopped(timeline.completed, fault, after)
            pauses.append((fault, completing))
            print(
                f"\n{fault.name}: lasted {fault.ended - fault.started:.1f}s; acceptance stopped "
                f"{accepting:.2f}s, completion stopped {completing:.2f}s"
            )
        print(
            f"payments={payments} rate={rate}/s statuses={dict(result.statuses)} lost={len(result.lost)} "
            f"doubled={len(result.doubled)} stuck={len(result.stuck)} wrong={len(result.wrong)} "
            f"unsent={result.unsent_outbox} slowest_flow={max(f.seconds for f in flows):.1f}s "
            f"accepted/s={len(timeline.accepted) / (max(timeline.accepted) - min(timeline.accepted)):.1f}"
        )
        assert not result.failures, result.report()
        for fault, completing in pauses:
            assert completing <= fault.ended - fault.started + SETTLE_AFTER_FAULT, (
                f"{fault.name}: flows stopped completing for {completing:.1f} s"
            )
        assert not backlog or not any(backlog.values()), backlog
    finally:
        if traffic is not None and not traffic.done():
            traffic.cancel()
        await stack.close()


async def _inflict(ha: Engines, stack: Stack, name: str) -> None:
    """One fault, until the engines are whole again."""
    if name == "broker-leader":
        assert stack.vhost is not None
        node = await asyncio.to_thread(ha.leader_of, stack.vhost)
        ha.kill_rabbit(node)
        await asyncio.sleep(20)  # the cluster works on two nodes meanwhile
        await ha.start_rabbit(node)
    elif name == "db-postmaster-killed":
        # The keeper restarts the killed postmaster (crash recovery) before the monitor would
        # fail over: either way, a primary must serve again and the formation be whole.
        await ha.kill_primary()
        await asyncio.sleep(1)
        await ha.formation_healthy()
    elif name == "db-primary-lost":
        old = await ha.primary_port()
        host = await ha.lose_primary()
        await ha.primary_moved_from(old)
        await asyncio.sleep(5)  # the lost host stays away a little after the failover
        await ha.start_node(host)
        await ha.formation_healthy()
    elif name == "planned-failover":
        old = await ha.primary_port()
        await ha.planned_failover()
        await ha.primary_moved_from(old)
        await ha.formation_healthy()
    else:
        raise ValueError(f"unknown fault {name!r}")


def _write_timeline(path: Path, began: float, timeline: Timeline, faults: list[Fault]) -> None:
    """Per second of the run: authorizations accepted and flows done, and the faults."""
    seconds = int(max([*timeline.completed, *timeline.accepted, began]) - began) + 1
    accepted, completed = [0] * seconds, [0] * seconds
    for t in timeline.accepted:
        accepted[int(t - began)] += 1
    for t in timeline.completed:
        completed[int(t - began)] += 1
    lines = [f"{f.name}: {f.started - began:.1f}s to {f.ended - began:.1f}s" for f in faults]
    lines += [f"{s:5d} accepted {a:4d} done {c:4d}" for s, (a, c) in enumerate(zip(accepted, completed, strict=True))]
    path.write_text("\n".join(lines) + "\n")


def _check_no_deaths(stack: Stack) -> None:
    dead = [d for name in stack.gateway_names() if (d := stack.death(name)) is not None]
    assert not dead, f"gateway processes died (none is restarted by hand): {[(d.name, d.stderr[-800:]) for d in dead]}"


async def test_drills_broker_leader_killed_postmaster_killed_primary_lost_planned_failover(ha, card_key, tmp_path):
    await _drill(
        ha,
        card_key,
        payments=DRILL_PAYMENTS,
        rate=DRILL_RATE,
        faults=["broker-leader", "db-postmaster-killed", "db-primary-lost", "planned-failover"],
        forgetful=False,
        log_dir=tmp_path,
    )


async def test_soak_10000_lifecycles_across_repeated_faults_with_a_forgetful_bank(ha, card_key, tmp_path):
    await _drill(
        ha,
        card_key,
        payments=10000,
        rate=SOAK_RATE,
        faults=[
            "broker-leader",
            "db-primary-lost",
            "broker-leader",
            "planned-failover",
            "db-postmaster-killed",
            "db-primary-lost",
        ],
        forgetful=True,
        log_dir=tmp_path,
    )
