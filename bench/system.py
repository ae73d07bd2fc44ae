"""The whole gateway as real processes, on a private database and RabbitMQ vhost.

    system = System(opts); await system.setup()      # database, schema, vhost, mockbank, gateway-api
    await system.start_pipeline()                      # gateway-relay + gateway-worker
    system.pause("relay"); system.resume("relay")      # SIGSTOP / SIGCONT
    snap = await system.snapshot()                     # CPU seconds per process, xact_commit, RSS
    await system.teardown()                            # processes stopped, database and vhost dropped

Processes are the project's console scripts (tests.support.procs); the database
and the vhost come from tests.support.services, so the bench leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aio_pika
import aiohttp
import asyncpg

from bench.util import cpu_seconds, memory_kb, pids_by_comm
from gateway import db
from tests.support import services
from tests.support.procs import ScriptProcess, free_port

API_KEY = "sk_bench_0123456789"
MERCHANT = "bench"
ROLES = ("mockbank", "api", "relay", "worker")
ENTRY = {
    "api": ("gateway-api", "gateway.api.app:main"),
    "relay": ("gateway-relay", "worker.relay:main"),
    "worker": ("gateway-worker", "worker.consumer:main"),
}
ROOT = Path(__file__).resolve().parent.parent


class Proc(ScriptProcess):
    """A ScriptProcess whose whole captured stdout (the JSON log) can be read back."""

    def output_size(self) -> int:
        return os.fstat(self._out.fileno()).st_size if self._out is not None and not self._out.closed else 0

    def read_output(self, start: int = 0) -> bytes:
        if self._out is None or self._out.closed:
            return b""
        size = os.fstat(self._out.fileno()).st_size
        return os.pread(self._out.fileno(), max(0, size - start), start)


@dataclass
class Snapshot:
    """Counters at one instant; two of them make a phase's deltas."""

    at: float
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds so far (user + system)
    sys_cpu: dict[str, float] = field(default_factory=dict)  # role -> system (kernel) CPU seconds so far
    xact_commit: int = 0
    xact_rollback: int = 0
    pg: dict[int, float] = field(default_factory=dict)  # backend pid -> CPU seconds so far

    def cpu_delta(self, earlier: Snapshot) -> dict[str, float]:
        """CPU seconds per role between `earlier` and this snapshot."""
        delta = {name: value - earlier.cpu[name] for name, value in self.cpu.items() if name in earlier.cpu}
        delta["postgres"] = sum(v - earlier.pg.get(pid, 0.0) for pid, v in self.pg.items())
        return delta

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


class System:
    def __init__(self, opts: Options):
        self.opts = opts
        self.database_url: str | None = None
        self.amqp_url: str | None = None
        self.vhost: str | None = None
        self.procs: dict[str, Proc] = {}
        self.bank_url = ""
        self.api_url = ""
        self.card_key = base64.b64encode(os.urandom(32)).decode()
        self.stats: asyncpg.Connection | None = None  # on the admin database: its reads do not count
        self.conn: asyncpg.Connection | None = None  # on the private database, for the bench's own queries
        self.rabbit_pids = pids_by_comm("beam.smp")  # shared broker: other vhosts' work shows too

    @property
    def dbname(self) -> str:
        return urlparse(self.database_url).path.lstrip("/")

    # ---- set-up and tear-down -------------------------------------------------------------

    async def setup(self) -> None:
        self.database_url = await services.create_database(self.opts.admin_url)
        await db.migrate(self.database_url)
        if self.opts.without_outbox_notify:
            await self._drop_outbox_notify()
        self.amqp_url, self.vhost = await asyncio.to_thread(services.create_vhost, self.opts.amqp_url)
        self.stats = await asyncpg.connect(self.opts.admin_url)
        self.conn = await asyncpg.connect(self.database_url)
        bank_port, api_port = free_port(), free_port()
        self.bank_url = f"http://127.0.0.1:{bank_port}"
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.procs["mockbank"] = Proc(
            "mockbank",
            "--port",
            str(bank_port),
            env={
                "MIN_LATENCY_MS": "0",
                "MAX_LATENCY_MS": "0",
                "FAILURE_RATE": "0",
                "RESPONSE_LOSS_RATE": "0",
                "MOCKBANK_EXTRA_ACCOUNTS": str(self.opts.cards),
                "LOG_LEVEL": "warning",
            },
        ).start()
        api_args = ["--port", str(api_port)]
        if self.opts.api_pool_size:
            api_args += ["--db-pool-size", str(self.opts.api_pool_size)]
        self.procs["api"] = self._gateway("api", api_args, {}).start()
        await self.procs["mockbank"].wait_http(f"{self.bank_url}/health", timeout=60)
        await self.procs["api"].wait_http(f"{self.api_url}/healthz", timeout=30)

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "AMQP_URL": self.amqp_url,
            "BANK_URL": self.bank_url,
            "GATEWAY_API_KEYS": f"{MERCHANT}:{API_KEY}",
            "CARD_ENCRYPTION_KEY": self.card_key,
            "LOG_LEVEL": self.opts.log_level,
            **(extra or {}),
        }

    def _gateway(self, role: str, args: list[str], extra: dict[str, str]) -> Proc:
        script, entry = ENTRY[role]
        env = self._env(extra)
        if not self.opts.census:
            return Proc(script, *args, env=env)
        env["BENCH_CENSUS_OUT"] = str(self._census_path(role))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        return Proc(script, env=env, cwd=ROOT, argv=[sys.executable, "-m", "bench.census", entry, *args])

    def _census_path(self, role: str) -> Path:
        return Path(f"/tmp/bench-census-{os.getpid()}-{role}.json")

    async def census(self) -> dict[str, dict[str, int]]:
        """Counters of every census-run gateway process right now (SIGUSR1 makes each write them)."""
        if not self.opts.census:
            return {}
        roles = [r for r in ENTRY if r in self.procs and self.procs[r].running]
        for role in roles:
            self._census_path(role).unlink(missing_ok=True)
            os.kill(self.procs[role].pid, signal.SIGUSR1)
        out = {}
        for role in roles:
            path = self._census_path(role)
            for _ in range(100):
                if path.exists():
                    break
                await asyncio.sleep(0.02)
            out[role] = json.loads(path.read_text()) if path.exists() else {}
        return out

    async def start_pipeline(self) -> None:
        """gateway-relay and gateway-worker; returns once the worker consumes payments.work."""
        relay_env = dict(self.opts.relay_env)
        if self.opts.without_outbox_notify:
            relay_env.setdefault("RELAY_POLL_SECONDS", "0.02")
        self.procs["relay"] = self._gateway("relay", [], relay_env).start()
        self.procs["worker"] = self._gateway("worker", [], self.opts.worker_env).start()
        deadline = time.monotonic() + 60
        connection = await aio_pika.connect(self.amqp_url)
        try:
            while True:
                for name in ("relay", "worker"):
                    if not self.procs[name].running:
                        raise RuntimeError(
                            f"gateway-{name} exited:\n{self.procs[name].stdout_tail()}{self.procs[name].stderr_tail()}"
                        )
                try:
                    channel = await connection.channel()
                    queue = await channel.declare_queue("payments.work", passive=True)
                    consumers = queue.declaration_result.consumer_count
                    await channel.close()
                    if consumers >= 1:
                        return
                except aio_pika.exceptions.ChannelClosed:
                    pass  # not declared yet
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway-worker did not start consuming payments.work within 60 s")
                await asyncio.sleep(0.1)
        finally:
            await connection.close()

    async def _drop_outbox_notify(self) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute("DROP TRIGGER outbox_inserted ON outbox")
        finally:
            await conn.close()

    async def teardown(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.popen is not None and proc.running:
                with contextlib.suppress(Exception):
                    os.kill(proc.pid, signal.SIGCONT)  # a paused process could not handle SIGTERM
            await proc.stop(timeout=15)
            proc.close()
            if name in ENTRY:
                self._census_path(name).unlink(missing_ok=True)
        for conn in (self.conn, self.stats):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        if self.database_url:
            with contextlib.suppress(Exception):
                await services.drop_database(self.opts.admin_url, self.database_url)
        if self.vhost:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(services.delete_vhost, self.vhost)

    # ---- control ----------------------------------------------------------------------------

    def pause(self, *names: str) -> None:
        for name in names:
            os.kill(self.procs[name].pid, signal.SIGSTOP)

    def resume(self, *names: str) -> None:
        for name in names:
            os.kill(self.procs[name].pid, signal.SIGCONT)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if not proc.running:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{proc.stderr_tail()}\n{proc.stdout_tail()}")

    async def set_chaos(self, **chaos) -> None:
        async with aiohttp.ClientSession() as session, session.put(f"{self.bank_url}/_mock/chaos", json=chaos) as resp:
            if resp.status != 200:
                raise RuntimeError(f"PUT /_mock/chaos answered {resp.status}: {await resp.text()}")

    async def cards(self, count: int) -> list[dict]:
        """Generated accounts of the mock bank (big balances), as GET /_mock/accounts lists them."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.bank_url}/_mock/accounts", params={"offset": 4, "limit": count}) as resp,
        ):
            listing = await resp.json()
        cards = [a for a in listing["accounts"] if a["kind"] == "extra"]
        if not cards:
            raise RuntimeError("the mock bank has no generated accounts (MOCKBANK_EXTRA_ACCOUNTS)")
        return cards

    async def clear_data(self) -> None:
        """Empty every table: used after the isolated API runs, before the pipeline starts."""
        await self.conn.execute(
            "TRUNCATE payments, payment_history, operations, card_vault, idempotency_keys, outbox, "
            "reconciliation_findings"
        )

    # ---- measurements -------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.popen is not None else None

    async def snapshot(self) -> Snapshot:
        """CPU seconds of every process and the private database's transaction counters.

        pg_stat_database is flushed by each backend at most once a second (and an idle one
        only after 10 s), so xact_commit deltas are trustworthy over windows taken while the
        load is running, not between idle moments.
        """
        row = await self.stats.fetchrow(
            "SELECT xact_commit, xact_rollback, "
            "       (SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = $1) AS pids "
            "  FROM pg_stat_database WHERE datname = $1",
            self.dbname,
        )
        snap = Snapshot(at=time.perf_counter(), xact_commit=row["xact_commit"], xact_rollback=row["xact_rollback"])
        for pid in row["pids"] or ():
            value = cpu_seconds(pid)
            if value is not None:
                snap.pg[pid] = value
        for name in self.procs:
            value = cpu_seconds(self.pid(name), split=True)
            if value is not None:
                snap.cpu[name] = value[0] + value[1]
                snap.sys_cpu[name] = value[1]
        snap.cpu["rabbitmq"] = sum(filter(None, (cpu_seconds(p) for p in self.rabbit_pids)))
        snap.cpu["loadgen"] = cpu_seconds(os.getpid()) or 0.0
        return snap

    async def table_stats(self) -> list[dict]:
        """Per-table tuples and autovacuum/autoanalyze runs in the private database so far."""
        rows = await self.conn.fetch(
            "SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count "
            "FROM pg_stat_user_tables ORDER BY relname"
        )
        return [dict(r) for r in rows]

    def memory(self) -> dict[str, tuple[int | None, int | None]]:
        """role -> (VmRSS kB, VmHWM kB)."""
        return {name: memory_kb(self.pid(name)) for name in self.procs}
