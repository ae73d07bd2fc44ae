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
from urllib.parse import urlsplit

import asyncpg

from bench.util import ProcStat, listening_pid, memory_kb, proc_stat
from harness.system import BANK, GATEWAY_KINDS, HARNESS_APP, System

API_KEY = "sk_bench_0123456789"
MERCHANT = "bench"
ROLES = (BANK, *GATEWAY_KINDS)
ROOT = Path(__file__).resolve().parent.parent
# The API-alone scenarios measure what the API can do, not its admission: with no worker running
# nothing finishes, and the backlog bound (at least --max-in-flight operations) would refuse
# all after the first few thousand. The checkout scenarios restart the API as shipped.
LIFTED_BOUNDS = ("--max-in-flight", str(10**6))


class CostUnknown(RuntimeError):
    """A process whose CPU counts ended or was replaced between two readings: its CPU since the
    first is unknown, and a figure without it would be wrong."""


Process = tuple[int, int]  # (pid, start time): a pid alone may be reused


@dataclass
class Snapshot:
    """Counters at one instant; two of them make a phase's deltas.

    CPU is read from /proc per part: each kind of gateway process (and the mock bank), the
    load generator, "postgres" (the backends connected to the private database, but the
    harness's and the bench's own, plus the server's own processes: postmaster, walwriter,
    checkpointer, background writer, launchers; these are shared with whatever else the
    server runs) and "rabbitmq" (the beam.smp listening on the AMQP URL's port; shared too).
    """

    at: float
    cpu_of: dict[str, dict[Process, tuple[float, float]]] = field(default_factory=dict)  # part -> (user, system)
    may_end: set[Process] = field(default_factory=set)  # autovacuum workers: their last moments go uncounted
    xact_commit: int = 0
    xact_rollback: int = 0

    def add(self, part: str, stat: ProcStat | None, *, may_end: bool = False) -> None:
        if stat is None:
            return
        key = (stat.pid, stat.started)
        self.cpu_of.setdefault(part, {})[key] = (stat.user, stat.system)
        if may_end:
            self.may_end.add(key)

    def _delta(self, earlier: Snapshot, kernel: bool) -> dict[str, float]:
        def seconds(reading: tuple[float, float]) -> float:
            return reading[1] if kernel else reading[0] + reading[1]

        out = {}
        for part in self.cpu_of.keys() | earlier.cpu_of.keys():
            now, before = self.cpu_of.get(part, {}), earlier.cpu_of.get(part, {})
            gone = [key[0] for key in before if key not in now and key not in earlier.may_end]
            if gone:
                raise CostUnknown(f"{part}: process {gone} ended or was replaced during the measurement")
            out[part] = sum(seconds(r) - (seconds(before[key]) if key in before else 0.0) for key, r in now.items())
        return out

    def cpu_delta(self, earlier: Snapshot) -> dict[str, float]:
        """CPU seconds (user + system) per part between `earlier` and this snapshot; a process
        started meanwhile counts in full."""
        return self._delta(earlier, kernel=False)

    def sys_delta(self, earlier: Snapshot) -> dict[str, float]:
        """Kernel CPU seconds per part between `earlier` and this snapshot."""
        return self._delta(earlier, kernel=True)


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
        self.broker_pid: int | None = None  # the RabbitMQ node serving amqp_url: other vhosts' work shows too

    @property
    def db(self) -> asyncpg.Connection:
        """The bench's own connection to the private database, once started."""
        assert self.conn is not None, "not started"
        return self.conn

    async def admission(self, *, shipped: bool) -> None:
        """Restart the API processes with every admission bound at its default (shipped) or with
        the bounds lifted (as they start)."""
        args = [a for a in self.api_args if a not in LIFTED_BOUNDS]
        self.api_args = args if shipped else [*args, *LIFTED_BOUNDS]
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
        self.broker_pid = listening_pid(urlsplit(self.opts.amqp_url).port or 5672)
        self.stats = await asyncpg.connect(self.opts.admin_url)
        self.conn = await asyncpg.connect(self.database_url, server_settings={"application_name": HARNESS_APP})
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
        """CPU seconds of every part (see Snapshot) and the private database's transaction counters.

        pg_stat_database is flushed by each backend at most once a second (and an idle one
        only after 10 s), so xact_commit deltas are trustworthy over windows taken while the
        load is running, not between idle moments.
        """
        assert self.stats is not None and self.broker_pid is not None, "not started"
        row = await self.stats.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1", self.database_name
        )
        assert row is not None
        backends = await self.stats.fetch(
            "SELECT pid, backend_type FROM pg_stat_activity "
            " WHERE (datname = $1 AND application_name IS DISTINCT FROM $2) OR datname IS NULL",
            self.database_name,
            HARNESS_APP,
        )
        snap = Snapshot(at=time.perf_counter(), xact_commit=row["xact_commit"], xact_rollback=row["xact_rollback"])
        for name in self.procs:
            snap.add(self.kind[name], proc_stat(self.pid(name)))
        postmaster = set()
        for backend in backends:
            stat = proc_stat(backend["pid"])
            snap.add("postgres", stat, may_end=backend["backend_type"] == "autovacuum worker")
            if stat is not None and backend["backend_type"] == "checkpointer":
                postmaster.add(stat.ppid)
        if len(postmaster) != 1:
            raise CostUnknown("PostgreSQL's postmaster not found (no checkpointer in pg_stat_activity?)")
        snap.add("postgres", proc_stat(postmaster.pop()))
        broker = proc_stat(self.broker_pid)
        if broker is None:
            raise CostUnknown(f"RabbitMQ (pid {self.broker_pid}) cannot be read")
        snap.add("rabbitmq", broker)
        snap.add("loadgen", proc_stat(os.getpid()))
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
