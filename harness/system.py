"""The whole system as real processes: the one harness of tests/e2e, tests/crash, the
integration tests, bench/ and `make run`.

    system = System(server_urls, card_key,                  # (postgres admin URL, amqp URL)
                    bank_env={"FAILURE_RATE": "0.2"},       # the mock bank's start-up settings
                    gateway_env={"WORKER_RETRY_LADDER": "1,2,4"},
                    scale={"api": 2, "relay": 2, "worker": 2})
    await system.start()        # private database (schema applied) and vhost, mockbank, then
                                # every gateway process, each waited for until it is ready
    system.api_url, system.bank_url, system.database_url, system.amqp_url
    system.metrics_url("worker")                      # a process's /metrics, /healthz, /readyz (an
                                                      # API's admin listener: also /ops)
    system.bank                 # MockBankClient: /_mock ledger, chaos, faults, expire, reset
    system.pool                 # asyncpg pool on the database (application_name HARNESS_APP)
    await system.kill("worker")                       # SIGKILL
    await system.terminate("relay")                   # SIGTERM; returns the exit code
    await system.restart("worker", env={"GATEWAY_CRASH_POINTS": "worker.after_bank:@3"})
    await system.restart("mockbank", env={"AUTH_EXPIRY_HOURS": "0.001"})  # same port, empty books
    name = await system.start_process("worker")       # one more worker: "worker-2"
    system.death("worker")      # None while it runs; else its exit code and the crash point
    await system.close()        # processes stopped; private database and vhost dropped

    async with System(...) as system: ...            # start() and close()

Names: the mock bank is "mockbank"; the first gateway process of a kind is named after
it ("api", "relay", "worker"), further ones "worker-2", "worker-3"... `start(*kinds)` may
be called again for kinds not started yet (the bench starts the API alone first).
gateway-webhooks ("webhooks") is started only when named: `start("webhooks")`.

Each process's environment: this process's own, then for the gateway DATABASE_URL,
AMQP_URL, BANK_URL, GATEWAY_API_KEYS, CARD_ENCRYPTION_KEY and GATEWAY_ENV=development,
then `gateway_env`
(`bank_env` for the bank), then `env_for(kind, name)` (gateway processes, called at
every start: crash tests arm each start differently), then a restart's `env`; a None
value removes a variable. Readiness: mockbank answers /health, an API /readyz on its
admin port (each of its processes', with --workers N); a worker shows as a consumer of
payments.work, a relay as a LISTEN "outbox" connection.

Each process serves its metrics on a port of its own (API_ADMIN_PORT, a run of N ports
for an API with --workers N; WORKER_METRICS_PORT, RELAY_METRICS_PORT): free ones, or
`metrics_ports` for the first of a kind.

For `make run`: `database_url=` a persistent database (created if missing, schema
applied, kept), `private_vhost=False`, fixed `api_port` / `bank_port` / `metrics_ports`,
`log_dir`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import aio_pika
import asyncpg

from gateway import broker, db
from gateway.config import DEV_API_KEYS
from harness import services
from harness.mockbank_client import MockBankClient
from harness.procs import ProcessError, ScriptProcess, free_port, free_ports

__all__ = ["BANK", "GATEWAY_KINDS", "HARNESS_APP", "OPTIONAL_KINDS", "Death", "System"]

GATEWAY_KINDS = ("api", "relay", "worker")
# Started only when asked for by name: start("webhooks").
OPTIONAL_KINDS = ("webhooks",)
BANK = "mockbank"
SCRIPTS = {
    "api": "gateway-api",
    "relay": "gateway-relay",
    "worker": "gateway-worker",
    "webhooks": "gateway-webhooks",
    BANK: "mockbank",
}
METRICS_PORT_VARIABLES = {
    "api": "API_ADMIN_PORT",
    "relay": "RELAY_METRICS_PORT",
    "worker": "WORKER_METRICS_PORT",
    "webhooks": "WEBHOOK_METRICS_PORT",
}
HARNESS_APP = "gateway-harness"  # application_name of the harness's own database connections
READY_TIMEOUT = 60.0
WORK_QUEUE = "payments.work"
_CRASH_LINE = re.compile(r"gateway crash point: (\S+) pid=(\d+)")

EnvFor = Callable[[str, str], Mapping[str, str | None]]


@dataclass
class Death:
    name: str
    returncode: int | None
    point: str | None  # the crash point that fired (GATEWAY_CRASH_POINTS), None for any other death
    stderr: str


class System:
    """The mock bank and the gateway's processes on their own database and vhost."""

    def __init__(
        self,
        server_urls: tuple[str, str],
        card_key: str,
        *,
        database_url: str | None = None,
        private_vhost: bool = True,
        scale: Mapping[str, int] | None = None,
        bank_env: Mapping[str, str | None] | None = None,
        gateway_env: Mapping[str, str | None] | None = None,
        env_for: EnvFor | None = None,
        api_keys: str = DEV_API_KEYS,
        api_args: Sequence[str] = (),
        api_port: int | None = None,
        bank_port: int | None = None,
        metrics_ports: Mapping[str, int] | None = None,
        log_dir: Path | None = None,
        launcher: Sequence[str] = (),
        cwd: Path | None = None,
    ):
        """``server_urls``: PostgreSQL (any database on the server: a private database is made
        there unless ``database_url`` names one to use and keep) and RabbitMQ (a private vhost
        is made unless ``private_vhost`` is False). ``scale``: processes per gateway kind
        (default one each). ``api_port`` is the first API's (others get free ports), and
        ``metrics_ports`` the first API's admin port and the first relay's and worker's
        metrics ports (``{"api": 9100, "worker": 9101}``).
        ``log_dir``: each process's stdout and stderr appended to ``<name>.log`` there (else
        temporary files). ``launcher``: argv put before each gateway console script (bench's
        census runs ``python -m bench.census gateway-api ...``), run in ``cwd``."""
        self.admin_url, self.amqp_root = server_urls
        self.card_key = card_key
        self.keep_database = database_url is not None
        self.database_url = database_url
        self.private_vhost = private_vhost
        self.scale = {kind: 1 for kind in (*GATEWAY_KINDS, *OPTIONAL_KINDS)} | dict(scale or {})
        self.bank_env = dict(bank_env or {})
        self.gateway_env = dict(gateway_env or {})
        self.env_for = env_for
        self.api_keys = api_keys
        self.api_args = list(api_args)
        self.log_dir = log_dir
        self.launcher = list(launcher)
        self.cwd = cwd
        self.amqp_url = self.amqp_root
        self.vhost: str | None = None
        self.pool: asyncpg.Pool | None = None
        self.bank_port = bank_port or free_port()
        self.bank_url = f"http://127.0.0.1:{self.bank_port}"
        self.bank = MockBankClient(self.bank_url)
        self.procs: dict[str, ScriptProcess] = {}  # the running (or last) incarnation of each name
        self.kind: dict[str, str] = {}
        self.ports: dict[str, int] = {"api": api_port or free_port()}
        # name -> its metrics port: an API's admin port (the first of its processes'), a
        # relay's or a worker's only port.
        self.metrics_ports: dict[str, int] = dict(metrics_ports or {})
        self.retired: list[ScriptProcess] = []  # dead or replaced incarnations, kept for their output
        self._prepared = False

    # ---- where things are

    @property
    def api_url(self) -> str:
        """The first API's base URL."""
        return self.api_urls[0]

    @property
    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.ports[name]}" for name in self.names("api") or ["api"]]

    @property
    def api_processes(self) -> int:
        """Processes per API (--workers N), each with its own admin port."""
        args = self.api_args
        return int(args[args.index("--workers") + 1]) if "--workers" in args else 1

    def metrics_url(self, name: str, process: int = 0) -> str:
        """Where ``name`` serves /metrics, /healthz and /readyz (an API: its admin listener, also
        /ops; with --workers N, that of its process number ``process``, 0 to N - 1)."""
        return f"http://127.0.0.1:{self.metrics_ports[name] + process}"

    @property
    def database_name(self) -> str:
        assert self.database_url is not None, "not started"
        return urlparse(self.database_url).path.lstrip("/")

    def names(self, kind: str | None = None) -> list[str]:
        """Names of the processes started so far (of one kind), in start order."""
        return [name for name in self.procs if kind is None or self.kind[name] == kind]

    def gateway_names(self) -> list[str]:
        return [name for name in self.procs if self.kind[name] != BANK]

    # ---- lifecycle

    async def start(self, *kinds: str) -> System:
        """prepare(), then ``scale[kind]`` processes of each kind (default: api, relay, worker)
        not started yet, all waited for until ready."""
        await self.prepare()
        started = []
        for kind in kinds or GATEWAY_KINDS:
            for _ in range(self.scale[kind] - len(self.names(kind))):
                started.append(self._spawn(kind, self._next_name(kind)))
        for name in started:  # all of them are starting meanwhile
            await self.wait_ready(name)
        return self

    async def prepare(self) -> None:
        """The database (schema applied), the vhost and the mock bank, once; start() does it
        first. Call it alone to change the database before any gateway process starts."""
        if self._prepared:
            return
        if self.database_url is None:
            self.database_url = await services.create_database(self.admin_url)
        else:
            await services.ensure_database(self.database_url)
        await db.migrate(self.database_url)
        if self.private_vhost:
            self.amqp_url, self.vhost = await asyncio.to_thread(services.create_vhost, self.amqp_root)
        self.pool = await db.create_pool(
            self.database_url, min_size=1, max_size=4, server_settings={"application_name": HARNESS_APP}
        )
        self._spawn(BANK, BANK)
        await self.wait_ready(BANK)
        self._prepared = True

    async def start_process(self, kind: str, *, env: Mapping[str, str | None] | None = None, wait: bool = True) -> str:
        """One more process of ``kind``; returns its name."""
        name = self._next_name(kind)
        self._spawn(kind, name, env)
        if wait:
            await self.wait_ready(name)
        return name

    async def restart(self, name: str, *, env: Mapping[str, str | None] | None = None, wait: bool = True) -> None:
        """Start ``name`` again, with the same port, after stopping it if it still runs
        (SIGTERM, then SIGKILL). ``env`` is laid over its usual environment for this start."""
        old = self.procs[name]
        if old.running:
            await old.stop(timeout=10)
        self.retired.append(old)
        self._spawn(self.kind[name], name, env)
        if wait:
            await self.wait_ready(name)

    async def kill(self, name: str) -> int | None:
        """SIGKILL, as a crash would; returns the exit code (-9)."""
        return await self.procs[name].kill()

    async def terminate(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait for the exit (SIGKILL after ``timeout`` s); returns the exit code."""
        return await self.procs[name].stop(timeout=timeout)

    def pause(self, *names: str) -> None:
        """SIGSTOP: the processes keep their connections but do nothing until resume()."""
        for name in names:
            self.procs[name].pause()

    def resume(self, *names: str) -> None:
        for name in names:
            self.procs[name].resume()

    async def close(self) -> None:
        """Stop every process (gateway first, then the bank), close the harness's connections,
        drop the private database and vhost. Safe after a failed or partial start."""
        gateway = [self.procs[name] for name in self.gateway_names()]
        await asyncio.gather(*(proc.stop(timeout=10) for proc in gateway), return_exceptions=True)
        if BANK in self.procs:
            await self.procs[BANK].stop(timeout=10)
        for proc in [*self.retired, *self.procs.values()]:
            proc.close()
        await self.bank.close()
        if self.pool is not None:
            await self.pool.close()
        if self.vhost:
            await asyncio.to_thread(services.delete_vhost, self.vhost)
        if self.database_url and not self.keep_database:
            await services.drop_database(self.admin_url, self.database_url)

    async def __aenter__(self) -> System:
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- processes

    def _next_name(self, kind: str) -> str:
        if kind not in (*GATEWAY_KINDS, *OPTIONAL_KINDS):
            kinds = ", ".join((*GATEWAY_KINDS, *OPTIONAL_KINDS))
            raise ValueError(f"unknown process kind {kind!r}; one of {kinds}")
        count = len(self.names(kind))
        return kind if count == 0 else f"{kind}-{count + 1}"

    def gateway_base_env(self) -> dict[str, str | None]:
        """What every gateway process is given (before gateway_env)."""
        return {
            "DATABASE_URL": self.database_url,
            "AMQP_URL": self.amqp_url,
            "BANK_URL": self.bank_url,
            "GATEWAY_API_KEYS": self.api_keys,
            "CARD_ENCRYPTION_KEY": self.card_key,
            # The harness runs the published development keys: only development mode takes them.
            "GATEWAY_ENV": "development",
        }

    def _spawn(self, kind: str, name: str, extra: Mapping[str, str | None] | None = None) -> str:
        script = SCRIPTS[kind]
        log = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        if kind == BANK:
            proc = ScriptProcess(script, "--port", str(self.bank_port), env={**self.bank_env, **(extra or {})}, log=log)
        else:
            args = []
            if kind == "api":
                args = ["--port", str(self.ports.setdefault(name, free_port())), *self.api_args]
            run = self.api_processes if kind == "api" else 1
            metrics_port = {METRICS_PORT_VARIABLES[kind]: str(self.metrics_ports.setdefault(name, free_ports(run)))}
            env = {
                **self.gateway_base_env(),
                **metrics_port,
                **self.gateway_env,
                **(self.env_for(kind, name) if self.env_for else {}),
                **(extra or {}),
            }
            argv = [*self.launcher, script, *args] if self.launcher else None
            proc = ScriptProcess(script, *args, env=env, argv=argv, cwd=self.cwd, log=log)
        self.procs[name] = proc.start()
        self.kind[name] = kind
        return name

    async def wait_ready(self, name: str, timeout: float = READY_TIMEOUT) -> None:
        """Until ``name`` serves (see the module docstring); ProcessError if it dies first."""
        proc, kind = self.procs[name], self.kind[name]
        if kind == BANK:
            await proc.wait_http(f"{self.bank_url}/health", timeout=timeout)
        elif kind == "api":
            for process in range(self.api_processes):
                await proc.wait_http(f"{self.metrics_url(name, process)}/readyz", timeout=timeout)
        elif kind == "webhooks":
            await proc.wait_http(f"{self.metrics_url(name)}/readyz", timeout=timeout)
        elif kind == "worker":
            await proc.wait_for(self._consumers_at_least(self.running("worker")), f"consume {WORK_QUEUE}", timeout)
        else:
            await proc.wait_for(self._listeners_at_least(self.running("relay")), "LISTEN on outbox", timeout)

    def running(self, kind: str) -> int:
        return sum(1 for name in self.names(kind) if self.procs[name].running)

    def _consumers_at_least(self, count: int):
        async def check() -> bool:
            try:
                connection = await broker.connect(self.amqp_url, timeout=5)
            except (OSError, aio_pika.exceptions.AMQPError):
                return False
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(WORK_QUEUE, passive=True)
                return (queue.declaration_result.consumer_count or 0) >= count
            except aio_pika.exceptions.ChannelClosed:
                return False  # not declared yet
            finally:
                await connection.close()

        return check

    def _listeners_at_least(self, count: int):
        async def check() -> bool:
            assert self.pool is not None
            found = await self.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%\"outbox\"'"
            )
            return found >= count

        return check

    def death(self, name: str) -> Death | None:
        """If ``name`` has died: how (its crash point, if one fired). None while it runs."""
        proc = self.procs[name]
        if proc.running:
            return None
        tail = proc.stderr_tail(3000)
        points = _CRASH_LINE.findall(tail)
        point = points[-1][0] if points and points[-1][1] == str(proc.pid) else None
        return Death(name, proc.returncode, point, tail)

    def check_alive(self) -> None:
        """ProcessError for the first process that is not running."""
        for proc in self.procs.values():
            if not proc.running:
                raise proc.error("is not running")

    def log_lines(self, needle: str, limit: int = 40) -> list[str]:
        """Lines of every process's output (also of dead incarnations) that mention ``needle``."""
        lines = []
        for proc in [*self.retired, *self.procs.values()]:
            texts = [proc.stdout_tail(50_000_000)] + ([] if proc.log else [proc.stderr_tail(1_000_000)])
            for text in texts:
                lines += [f"{proc.name}[{proc.pid}] {line}" for line in text.splitlines() if needle in line]
        return lines[:limit]

    # ---- what an outage does to the gateway, without touching anyone else's work

    async def terminate_gateway_connections(self) -> int:
        """pg_terminate_backend for every connection to the system's database except the
        harness's own: what a database restart does to the gateway. Returns how many."""
        admin = await asyncpg.connect(services.with_database(self.admin_url, "postgres"))
        try:
            return await admin.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                    WHERE datname = $1 AND pid <> pg_backend_pid() AND application_name <> $2""",
                self.database_name,
                HARNESS_APP,
            )
        finally:
            await admin.close()

    async def close_broker_connections(self) -> None:
        """Close every AMQP connection of the private vhost (the gateway's and any test's):
        what a broker restart does to the clients, without stopping the shared RabbitMQ."""
        if not self.vhost:
            raise ProcessError("close_broker_connections needs a private vhost (and rabbitmqctl)")
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "close_all_connections",
            "--vhost",
            self.vhost,
            "test: broker restart",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 120)
        if proc.returncode != 0:
            raise ProcessError(f"rabbitmqctl close_all_connections failed: {err.decode()[-500:]}")
