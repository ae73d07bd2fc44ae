"""The gateway as the bench runs it: the system harness (harness/system.py) plus
what the bench reads off it.

    system = BenchSystem(opts)
    await system.start("api")                # private database (schema) + vhost, mockbank, gateway-api
    await system.start("relay", "worker")    # the pipeline, once the worker consumes payments.work
    system.pause("relay"); system.resume("relay")        # SIGSTOP / SIGCONT
    snap = await system.snapshot()           # CPU seconds per kind of process, xact_commit
    await system.close()                     # processes stopped, database and vhost dropped

The private database and vhost come from the harness, so the bench leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.util import cpu_seconds, memory_kb, pids_by_comm
from harness.system import BANK, GATEWAY_KINDS, System

API_KEY = "sk_bench_0123456789"
MERCHANT = "bench"
ROLES = (BANK, *GATEWAY_KINDS)
ROOT = Path(__file__).resolve().parent.parent
# The API-alone scenarios measure what the API can do, not its admission: with no worker running
# nothing finishes, and the backlog bound (at least --max-in-flight operations) would refuse
# all after the first few thousand. The admission scenarios restart the API as shipped.
LIFTED_BOUNDS = ("--max-in-flight", str(10**6))


@dataclass
class Snapshot:
    """Counters at one instant; two of them make a phase's deltas."""

    at: float
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds so far (user + system)
    sys_cpu: dict[str, float] = field(default_factory=dict)  # role -> system (kernel) CPU seconds so far
    xact_commit: int = 0
    xact_rollback: int = 0
    pg: dict[int, float] = field(default_factory=dict)  # backend pid -> CPU seconds so far
    # every postgres process of the server (the gateway's backends and the server's own
    # walwriter, checkpointer, autovacuum...) -> CPU seconds so far
    pg_server: dict[int, float] = field(default_factory=dict)

    def cpu_delta(self, earlier: Snapshot) -> dict[str, float]:
        """CPU seconds per role between `earlier` and this snapshot."""
        delta = {name: value - earlier.cpu[name] for name, value in self.cpu.items() if name in earlier.cpu}
        delta["postgres"] = sum(v - earlier.pg.get(pid, 0.0) for pid, v in self.pg.items())
        return delta

    def pg_server_delta(self, earlier: Snapshot) -> float:
        """CPU seconds of the whole PostgreSQL server between `earlier` and this snapshot (a
        process started meanwhile counts in full; one gone meanwhile loses its last moments)."""
        return sum(v - earlier.pg_server.get(pid, 0.0) for pid, v in self.pg_server.items())

    def sys_delta(self, earlier: Snapshot) -> dict[str, float]:
        """Kernel CPU seconds per gateway process between `earlier` and this snapshot."""
        return {n: v - earlier.sys_cpu[n] for n, v in self.sys_cpu.items() if n in earlier.sys_cpu}


@dataclass
class Options:
    admin_url: str
    amqp_url: str
    cards: int = 10_000
    api_pool_size: int | None = None
    log_level: str = "info"
    worker_env: dict[str, str] = field(default_factory=dict)
    relay_env: dict[str, str] = field(default_factory=dict)
    without_outbox_notify: bool = False
    census: bool = False  # run api/relay/worker under bench.census (round trips counted)
    scale: dict[str, int] = field(default_factory=dict)  # processes per gateway kind (default one each)


class BenchSystem(System):
    def __init__(self, opts: Options):
        self.opts = opts
        super().__init__(
            (opts.admin_url, opts.amqp_url),
            base64.b64encode(os.urandom(32)).decode(),
            scale=opts.scale,
            bank_env={
                "MIN_LATENCY_MS": "0",
                "MAX_LATENCY_MS": "0",
                "FAILURE_RATE": "0",
                "RESPONSE_LOSS_RATE": "0",
                "MOCKBANK_EXTRA_ACCOUNTS": str(opts.cards),
                "LOG_LEVEL": "warning",
            },
            gateway_env={"LOG_LEVEL": opts.log_level},
            env_for=self._env_for,
            api_keys=f"{MERCHANT}:{API_KEY}",
            api_args=[
                *(["--db-pool-size", str(opts.api_pool_size)] if opts.api_pool_size else []),
                *LIFTED_BOUNDS,
            ],
            launcher=[sys.executable, "-m", "bench.census"] if opts.census else [],
            cwd=ROOT,
        )
        self.stats: asyncpg.Connection | None = None  # on the admin database: its reads do not count
        self.conn: asyncpg.Connection | None = None  # on the private database, for the bench's own queries
        self.rabbit_pids = pids_by_comm("beam.smp")  # shared broker: other vhosts' work shows too

    async def shipped_admission(self) -> None:
        """Restart the API processes with every admission bound at its default."""
        self.api_args = [a for a in self.api_args if a not in LIFTED_BOUNDS]
        for name in self.names("api"):
            await self.restart(name)

    def _env_for(self, kind: str, name: str) -> dict[str, str]:
        env = dict({"worker": self.opts.worker_env, "relay": self.opts.relay_env}.get(kind, {}))
        if kind == "relay" and self.opts.without_outbox_notify:
            env.setdefault("RELAY_POLL_SECONDS", "0.02")
        if self.opts.census:
            env["BENCH_CENSUS_OUT"] = str(self._census_path(name))
        return env

    # ---- set-up and tear-down -------------------------------------------------------------

    async def prepare(self) -> None:
        if self.conn is not None:
            return
        await super().prepare()
        self.stats = await asyncpg.connect(self.opts.admin_url)
        self.conn = await asyncpg.connect(self.database_url)
        if self.opts.without_outbox_notify:
            await self.conn.execute("DROP TRIGGER outbox_inserted ON outbox")

    async def close(self) -> None:
        for conn in (self.conn, self.stats):
            if conn is not None:
                await conn.close()
        await super().close()
        for name in self.gateway_names():
            self._census_path(name).unlink(missing_ok=True)

    # ---- control ----------------------------------------------------------------------------

    async def clear_data(self) -> None:
        """Empty every table: used after the isolated API runs, before the pipeline starts."""
        assert self.conn is not None, "not started"
        await self.conn.execute(
            "TRUNCATE payments, payment_history, operations, card_vault, idempotency_keys, outbox, "
            "reconciliation_findings"
        )

    # ---- measurements -------------------------------------------------------------------------

    def _census_path(self, name: str) -> Path:
        return Path(f"/tmp/bench-census-{os.getpid()}-{name}.json")

    async def census(self) -> dict[str, dict[str, int]]:
        """Counters of every census-run gateway process right now (SIGUSR1 makes each write
        them), summed per kind of process."""
        if not self.opts.census:
            return {}
        names = [name for name in self.gateway_names() if self.procs[name].running]
        for name in names:
            self._census_path(name).unlink(missing_ok=True)
            os.kill(self.procs[name].pid, signal.SIGUSR1)
        out: dict[str, Counter] = {}
        for name in names:
            path = self._census_path(name)
            for _ in range(100):
                if path.exists():
                    break
                await asyncio.sleep(0.02)
            counts = json.loads(path.read_text()) if path.exists() else {}
            out.setdefault(self.kind[name], Counter()).update(counts)
        return {kind: dict(counts) for kind, counts in out.items()}

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.popen is not None else None

    async def snapshot(self) -> Snapshot:
        """CPU seconds of every kind of process and the private database's transaction counters.

        pg_stat_database is flushed by each backend at most once a second (and an idle one
        only after 10 s), so xact_commit deltas are trustworthy over windows taken while the
        load is running, not between idle moments.
        """
        assert self.stats is not None, "not started"
        row = await self.stats.fetchrow(
            "SELECT xact_commit, xact_rollback, "
            "       (SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = $1) AS pids "
            "  FROM pg_stat_database WHERE datname = $1",
            self.database_name,
        )
        assert row is not None
        snap = Snapshot(at=time.perf_counter(), xact_commit=row["xact_commit"], xact_rollback=row["xact_rollback"])
        for pid in row["pids"] or ():
            value = cpu_seconds(pid)
            if value is not None:
                snap.pg[pid] = value
        for name in self.procs:
            value = cpu_seconds(self.pid(name), split=True)
            if value is not None:
                kind = self.kind[name]
                snap.cpu[kind] = snap.cpu.get(kind, 0.0) + value[0] + value[1]
                snap.sys_cpu[kind] = snap.sys_cpu.get(kind, 0.0) + value[1]
        for pid in pids_by_comm("postgres"):
            value = cpu_seconds(pid)
            if value is not None:
                snap.pg_server[pid] = value
        snap.cpu["rabbitmq"] = sum(filter(None, (cpu_seconds(p) for p in self.rabbit_pids)))
        snap.cpu["loadgen"] = cpu_seconds(os.getpid()) or 0.0
        return snap

    async def table_stats(self) -> list[dict]:
        """Per-table tuples and autovacuum/autoanalyze runs in the private database so far."""
        assert self.conn is not None, "not started"
        rows = await self.conn.fetch(
            "SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count "
            "FROM pg_stat_user_tables ORDER BY relname"
        )
        return [dict(r) for r in rows]

    def memory(self) -> dict[str, tuple[int | None, int | None]]:
        """process name -> (VmRSS kB, VmHWM kB)."""
        return {name: memory_kb(self.pid(name)) for name in self.procs}
