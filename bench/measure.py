"""End-to-end measurements from the gateway's own records.

* completion: a monitor polls one COUNT on the private database every 0.25 s until
  every accepted payment of the phase is final (no GET ?wait= per payment: that would
  add N long polls to the API and a NOTIFY wake-up each to what is measured);
* PostgreSQL commits per payment: pg_stat_database.xact_commit is flushed by each
  backend at most once a second, and by an IDLE backend only after 10 s. So deltas
  are taken either over a window inside steady load (closed loops: both edges lag
  alike) or between two QUIESCED points (QUIESCE seconds after all activity), which
  is exact. It counts what the server commits, including the read transaction
  every LISTENing backend runs when a NOTIFY wakes it (bench --census counts the
  client's own statements instead);
* per-step timings come afterwards from the timestamps the gateway writes itself:
  payments.created_at (API, before the submit transaction), operations.created_at
  (API, capture request), operations.first_attempt_at (worker's first claim),
  operations.bank_ms (worker, around the bank calls) and operations.finished_at
  (worker, the outcome's transaction):

      total     = finished_at - start            start = created_at of payment / operation
      overhead  = total - bank_ms                the gateway's own cost of the step
      dispatch  = first_attempt_at - start       outbox -> relay -> broker -> worker claim
      settle    = finished_at - first_attempt_at - bank_ms   claim, vault, record_outcome
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson

from bench.system import MERCHANT, BenchSystem, Snapshot
from bench.util import pcts

POLL = 0.25
QUIESCE = 11.0  # > PGSTAT_IDLE_INTERVAL (10 s): every idle backend has flushed its counters


@dataclass
class Tick:
    at: float  # perf_counter
    finals: int
    accepted: int
    xact_commit: int
    leased: int | None = None


@dataclass
class Completion:
    ticks: list[Tick] = field(default_factory=list)
    polls: int = 0  # the monitor's own transactions on the private database
    timed_out: bool = False


class Monitor:
    """Counts final payments of a phase while it runs (and xact_commit next to it)."""

    def __init__(
        self,
        system: BenchSystem,
        *,
        customer: str | None = None,
        ids: list[str] | None = None,
        in_progress: str = "pending",
        leased: bool = False,
    ):
        self.system = system
        self.customer, self.ids, self.in_progress, self.leased = customer, ids, in_progress, leased
        self.accepted = 0
        self.result = Completion()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _count(self) -> int:
        conn = self.system.db
        self.result.polls += 1
        if self.ids is not None:
            return await conn.fetchval(
                "SELECT count(*) FROM payments WHERE id = ANY($1::text[]) AND (status <> $2 OR attention_required)",
                self.ids,
                self.in_progress,
            )
        return await conn.fetchval(
            "SELECT count(*) FROM payments WHERE merchant = $1 AND customer_id = $2 "
            "AND (status <> $3 OR attention_required)",
            MERCHANT,
            self.customer,
            self.in_progress,
        )

    async def tick(self) -> Tick:
        finals = await self._count()
        assert self.system.stats is not None, "not started"
        xact = await self.system.stats.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.system.database_name
        )
        leased = None
        if self.leased:
            self.result.polls += 1
            leased = await self.system.db.fetchval(
                "SELECT count(*) FROM operations WHERE status = 'pending' AND lease_until > now()"
            )
        t = Tick(time.perf_counter(), finals, self.accepted, xact, leased)
        self.result.ticks.append(t)
        return t

    def start(self) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                await self.tick()
                try:
                    await asyncio.wait_for(self._stop.wait(), POLL)
                except TimeoutError:
                    pass

        self._task = asyncio.create_task(loop())

    async def wait_all_final(self, expected: int, timeout: float) -> Completion:
        """Keep polling until `expected` payments are final or `timeout` s pass."""
        deadline = time.perf_counter() + timeout
        while True:
            last = self.result.ticks[-1] if self.result.ticks else None
            if last is not None and last.finals >= expected:
                break
            if time.perf_counter() > deadline:
                self.result.timed_out = True
                break
            self.system.check_alive()
            await asyncio.sleep(POLL / 2)
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.result


@dataclass
class Steps:
    count: int  # operations of the phase (final or not)
    statuses: Counter
    attempts_over_1: int
    makespan_s: float
    steady_rate: float  # completions/s between the 10% and 90% finals
    total_ms: dict
    overhead_ms: dict
    dispatch_ms: dict
    settle_ms: dict
    bank_ms: dict
    in_flight_little: float  # mean bank calls in flight (Little: rate * mean claim-to-finish)
    finished_in: list[float]  # epoch seconds of finished_at, sorted

    @property
    def rate(self) -> float:
        """Finished operations / (last finished_at - first start): the e2e rate of the phase."""
        return len(self.finished_in) / self.makespan_s if self.makespan_s and self.makespan_s > 0 else float("nan")


async def steps(system: BenchSystem, kind: str, *, customer: str | None = None, ids: list[str] | None = None) -> Steps:
    start = "p.created_at" if kind == "authorize" else "o.created_at"
    where = "p.id = ANY($2::text[])" if ids is not None else "p.merchant = 'bench' AND p.customer_id = $2"
    rows = await system.db.fetch(
        f"""
        SELECT p.status, p.attention_required, o.status AS op_status, o.attempts, o.bank_ms,
               extract(epoch FROM {start}) AS t_start,
               extract(epoch FROM o.first_attempt_at) AS t_first,
               extract(epoch FROM o.finished_at) AS t_end
          FROM payments p JOIN operations o ON o.payment_id = p.id AND o.kind = $1
         WHERE {where}""",
        kind,
        ids if ids is not None else customer,
    )
    done = [r for r in rows if r["t_end"] is not None]
    statuses = Counter(r["status"] + ("+attention" if r["attention_required"] else "") for r in rows)
    total = [(float(r["t_end"]) - float(r["t_start"])) * 1000 for r in done]
    bank = [r["bank_ms"] for r in done]
    dispatch = [(float(r["t_first"]) - float(r["t_start"])) * 1000 for r in done if r["t_first"] is not None]
    settle = [(float(r["t_end"]) - float(r["t_first"])) * 1000 - r["bank_ms"] for r in done if r["t_first"] is not None]
    ends = sorted(float(r["t_end"]) for r in done)
    starts = [float(r["t_start"]) for r in rows]
    makespan = (ends[-1] - min(starts)) if ends and starts else float("nan")
    steady = float("nan")
    if len(ends) >= 20:
        i, j = int(len(ends) * 0.1), int(len(ends) * 0.9)
        if ends[j] > ends[i]:
            steady = (j - i) / (ends[j] - ends[i])
    held = [(float(r["t_end"]) - float(r["t_first"])) for r in done if r["t_first"] is not None]
    little = steady * (sum(held) / len(held)) if held and not math.isnan(steady) else float("nan")
    return Steps(
        count=len(rows),
        statuses=statuses,
        attempts_over_1=sum(1 for r in rows if r["attempts"] > 1),
        makespan_s=makespan,
        steady_rate=steady,
        total_ms=pcts(total),
        overhead_ms=pcts(t - b for t, b in zip(total, bank, strict=True)),
        dispatch_ms=pcts(dispatch),
        settle_ms=pcts(settle),
        bank_ms=pcts(bank),
        in_flight_little=little,
        finished_in=ends,
    )


def log_events(raw: bytes) -> Counter:
    """Warnings and errors of a JSON log by event, plus failed bank tries by outcome."""
    counts: Counter = Counter()
    for line in raw.splitlines():
        if b'"warning"' not in line and b'"error"' not in line and b"bank try failed" not in line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        event = entry.get("event", "?")
        if event == "bank try failed":
            counts[f"bank try failed: {entry.get('outcome')} {entry.get('http_status') or ''}".strip()] += 1
        elif entry.get("level") in ("warning", "error", "critical"):
            counts[f"{entry.get('level')}: {event}"] += 1
    return counts


def cpu_per_item(before: Snapshot, after: Snapshot, items: int) -> dict[str, tuple[float, float | None]]:
    """role -> (CPU ms per item (request or payment), kernel share of it) over a window."""
    if not items:
        return {}
    total, kernel = after.cpu_delta(before), after.sys_delta(before)
    return {
        name: (sec * 1000 / items, kernel[name] / sec if name in kernel and sec > 0 else None)
        for name, sec in total.items()
    }
