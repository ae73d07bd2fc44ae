"""Throughput and latency of POST /v1/payments from one gateway-api process.

    .venv/bin/python -m bench.submit [--clients 64] [--seconds 10] [--api-url URL]

Makes a private database (schema applied) on the local Postgres, starts
`gateway-api` on a free port against it, then drives authorize requests
from this process (aiohttp):

1. closed loop: N clients, each sends its next request when the previous one
   is answered; prints accepted/s and p50/p99 latency;
2. open loop at half the closed-loop rate: requests are sent on a fixed
   schedule whatever the answers do, and latency is measured from the
   scheduled send time (no coordinated omission); prints p50/p99.

Every request has its own order and Idempotency-Key, so each 202 is a new
payment. No worker runs: payments stay pending, which is what the API's
write path costs. The database is dropped at the end. With --api-url the
bench drives an API that is already running instead (no database is made).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway import config, db
from tests.support import services

API_KEY = "sk_bench_0123456789"
BODY = {
    "customer_id": "cus_bench", "amount": 5000, "currency": "USD",
    "card": {"number": "4111111111111111", "cvv": "123", "expiry_month": 12, "expiry_year": 2030},
}


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def record(self, status: int | None, seconds: float, error: str | None = None) -> None:
        if status is not None:
            self.statuses[status] += 1
            if status == 202:
                self.latencies.append(seconds)
        else:
            self.errors[error] += 1

    def pct(self, p: float) -> float:
        data = sorted(self.latencies)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(p / 100 * len(data)))] * 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _post(session: aiohttp.ClientSession, url: str, run: Run, started: float | None = None) -> None:
    key = uuid.uuid4().hex
    body = orjson.dumps({"order_id": f"ord_{key}", **BODY})
    headers = {"Idempotency-Key": key, "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    t0 = started if started is not None else time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            run.record(resp.status, time.perf_counter() - t0)
    except (TimeoutError, aiohttp.ClientError) as exc:
        run.record(None, 0.0, type(exc).__name__)


async def closed_loop(session: aiohttp.ClientSession, url: str, clients: int, seconds: float) -> tuple[Run, float]:
    run = Run()
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at:
            await _post(session, url, run)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return run, time.perf_counter() - started


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, seconds: float) -> tuple[Run, int]:
    run = Run()
    interval = 1.0 / rate
    total = int(rate * seconds)
    inflight: set[asyncio.Task] = set()
    peak = 0
    start = time.perf_counter()
    for i in range(total):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_post(session, url, run, started=due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        peak = max(peak, len(inflight))
    await asyncio.gather(*inflight)
    return run, peak


def _cpu_seconds(pid: int | None) -> float | None:
    """user+system CPU time of a process (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _report(title: str, run: Run, elapsed: float, cpu: float | None = None) -> None:
    accepted = run.statuses.get(202, 0)
    print(f"{title}: {accepted} accepted in {elapsed:.1f}s = {accepted / elapsed:,.0f} accepted/s; "
          f"latency p50 {run.pct(50):.1f} ms, p99 {run.pct(99):.1f} ms, max {run.pct(100):.1f} ms")
    if cpu is not None and accepted:
        print(f"  gateway-api CPU {cpu / accepted * 1e6:,.0f} us per accepted request, "
              f"{cpu / elapsed * 100:.0f}% of one core")
    other = {k: v for k, v in run.statuses.items() if k != 202}
    if other or run.errors:
        print(f"  other statuses {dict(other)} client errors {dict(run.errors)}")


async def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"gateway-api exited with {proc.returncode} before it was ready")
            try:
                async with session.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("gateway-api did not answer /healthz in time")


async def drive(base: str, clients: int, seconds: float, warmup: float, pid: int | None = None) -> None:
    url = f"{base}/v1/payments"
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup > 0:
            await closed_loop(session, url, clients, warmup)
        cpu0 = _cpu_seconds(pid)
        run, elapsed = await closed_loop(session, url, clients, seconds)
        cpu1 = _cpu_seconds(pid)
        _report(f"closed loop, {clients} clients", run, elapsed, cpu1 - cpu0 if cpu0 is not None else None)
        rate = run.statuses.get(202, 0) / elapsed / 2
        if rate < 1:
            print("open loop skipped: the closed loop accepted nothing")
            return
        cpu0 = _cpu_seconds(pid)
        run, peak = await open_loop(session, url, rate, seconds)
        cpu1 = _cpu_seconds(pid)
        _report(f"open loop at {rate:,.0f} req/s", run, seconds, cpu1 - cpu0 if cpu0 is not None else None)
        print(f"  peak requests in flight {peak}")


async def _drop_outbox_notify(database_url: str) -> None:
    """Diagnostic only, on the bench's private database: see --without-outbox-notify."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TRIGGER outbox_inserted ON outbox")
    finally:
        await conn.close()
    print("diagnostic run: outbox NOTIFY trigger dropped (nothing would wake a relay)")


async def main_async(args: argparse.Namespace) -> None:
    if args.api_url:
        await _wait_ready(args.api_url, None)
        await drive(args.api_url.rstrip("/"), args.clients, args.seconds, args.warmup)
        return
    admin_url = os.environ.get("DATABASE_URL", services.LOCAL_DATABASE_URL)
    database_url = await services.create_database(admin_url)
    proc = None
    log = tempfile.NamedTemporaryFile(prefix="bench-api-", suffix=".log", delete=False)
    try:
        await db.migrate(database_url)
        if args.without_outbox_notify:
            await _drop_outbox_notify(database_url)
        port = _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CARD_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
            "GATEWAY_API_KEYS": f"bench:{API_KEY}",
            "LOG_LEVEL": "info",
        }
        config.parse(env, need_card_key=True)  # fail here, not in the child, on a bad environment
        cmd = [sys.executable, "-m", "gateway.api.app", "--port", str(port)]
        if args.db_pool_size:
            cmd += ["--db-pool-size", str(args.db_pool_size)]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        await _wait_ready(base, proc)
        print(f"gateway-api pid {proc.pid} on {base}, database {database_url.rsplit('/', 1)[-1]}, log {log.name}")
        await drive(base, args.clients, args.seconds, args.warmup, proc.pid)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await services.drop_database(admin_url, database_url)
        if not args.keep_log:
            os.unlink(log.name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="closed-loop concurrency (default 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured closed-loop warm-up (default 2)")
    parser.add_argument("--db-pool-size", type=int, default=0, help="passed to gateway-api (default: its own)")
    parser.add_argument("--api-url", help="drive this running API instead of starting one")
    parser.add_argument("--keep-log", action="store_true", help="keep the API's log file")
    parser.add_argument(
        "--without-outbox-notify", action="store_true",
        help="diagnostic: drop the outbox NOTIFY trigger in the private database first. A transaction "
        "that NOTIFYs holds a database-wide lock through its commit, so such commits are serialized; "
        "this shows the API's throughput without that ceiling",
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
