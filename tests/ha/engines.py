"""Faults on the engines of scripts/ha/ha.sh: a broker node killed and brought back, the
database primary's postmaster killed (its keeper restarts it), the primary's whole host lost
(pg_auto_failover promotes the standby; the host comes back as the standby), or a switchover
by plan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncpg

PG_BIN = "/usr/lib/postgresql/15/bin"
WORK_QUEUE = "payments.work"


@dataclass
class Engines:
    database_url: str  # the formation, multi-host, target_session_attrs=read-write
    amqp_url: str  # the three nodes
    home: Path  # HA_DIR
    script: Path

    @property
    def server_urls(self) -> tuple[str, str]:
        return self.database_url, self.amqp_url

    # ---- RabbitMQ

    def _ctl(self, *args: str) -> str:
        out = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)
        return out.stdout

    def leader_of(self, vhost: str, queue: str = WORK_QUEUE) -> int:
        """The node number (1-3) that leads the quorum queue."""
        for node in (1, 2, 3):
            try:
                out = subprocess.run(
                    ["rabbitmq-queues", "-q", "-n", f"gwha{node}@localhost", "quorum_status", "-p", vhost, queue],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
            except subprocess.CalledProcessError:
                continue
            for line in out.splitlines():
                if "leader" in line:
                    return int(line.split("gwha", 1)[1][0])
        raise AssertionError(f"no node answers for the leader of {queue}")

    def running_rabbits(self) -> set[int]:
        """The nodes (1-3) that the cluster counts as running, as the first node that answers sees it."""
        for node in (1, 2, 3):
            try:
                out = subprocess.run(
                    ["rabbitmqctl", "-q", "-n", f"gwha{node}@localhost", "cluster_status", "--formatter", "json"],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
            except subprocess.CalledProcessError:
                continue
            return {int(name.split("@")[0].removeprefix("gwha")) for name in json.loads(out)["running_nodes"]}
        return set()

    def kill_rabbit(self, node: int) -> None:
        os.kill(int((self.home / "rabbit" / f"n{node}" / "pid").read_text()), signal.SIGKILL)

    async def start_rabbit(self, node: int) -> None:
        await asyncio.to_thread(
            subprocess.run, ["bash", str(self.script), "start-rabbit", str(node)], check=True, timeout=300
        )

    # ---- PostgreSQL

    async def primary_port(self) -> int:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            return int(await conn.fetchval("SELECT inet_server_port()"))
        finally:
            await conn.close()

    async def kill_primary(self) -> int:
        """SIGKILL the primary's postmaster (its keeper stays: pg_auto_failover promotes the
        standby, and the keeper brings the old primary back as the new standby)."""
        port = await self.primary_port()
        node = "node1" if port == 5441 else "node2"
        pid = int((self.home / "pg" / node / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        return port

    async def lose_primary(self) -> str:
        """SIGKILL the primary's keeper with everything it started (its process group: the
        postmaster and its backends), as if the host died: nothing restarts it, the monitor
        fails over to the standby. The node's name, for `start_node`."""
        port = await self.primary_port()
        node = "node1" if port == 5441 else "node2"
        keeper = Path("/tmp/pg_autoctl") / str(self.home).lstrip("/") / "pg" / node / "pg_autoctl.pid"
        os.killpg(int(keeper.read_text().split()[0]), signal.SIGKILL)
        return node

    async def start_node(self, node: str) -> None:
        """A data node's keeper again, after its host was lost: it rejoins as the standby."""
        await asyncio.to_thread(subprocess.run, ["bash", str(self.script), "start-pg", node], check=True, timeout=60)

    async def planned_failover(self) -> None:
        """`pg_autoctl perform failover`: the monitor switches primary and standby over by plan."""
        await asyncio.to_thread(
            subprocess.run,
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                "env",
                f"PATH={PG_BIN}:{os.environ['PATH']}",
                "pg_autoctl",
                "perform",
                "failover",
                "--pgdata",
                str(self.home / "pg" / "monitor"),
                "--wait",
                "60",
            ],
            check=True,
            timeout=120,
            cwd="/tmp",
        )

    async def primary_moved_from(self, port: int, timeout: float = 120) -> int:
        """Until another host serves as the primary (right after a fault the monitor still
        shows the old states: waiting for them alone would end at once); its port."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                now = await self.primary_port()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                now = port
            if now != port:
                return now
            await asyncio.sleep(0.2)
        raise AssertionError(f"no new primary within {timeout:.0f} s")

    async def formation_healthy(self, timeout: float = 300) -> None:
        """Until the formation has a primary and a secondary again. A lost host rejoining under
        100 payments/s on a busy machine took over two minutes to catch up (pg_rewind, WAL)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            out = await asyncio.to_thread(
                subprocess.run,
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    "env",
                    f"PATH={PG_BIN}:{os.environ['PATH']}",
                    "pg_autoctl",
                    "show",
                    "state",
                    "--pgdata",
                    str(self.home / "pg" / "monitor"),
                ],
                capture_output=True,
                text=True,
                cwd="/tmp",
            )
            states = [line.split("|")[-2:] for line in out.stdout.splitlines() if "|" in line]
            settled = [tuple(s.strip() for s in pair) for pair in states]
            if ("primary", "primary") in settled and ("secondary", "secondary") in settled:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await self.primary_port()  # and a read-write connection is served
                    return
            await asyncio.sleep(1)
        raise AssertionError(f"the formation did not recover in {timeout:.0f} s")
