"""gateway-api --workers N: N processes serve one port, under a parent that only supervises.

Real processes: the parent and its forked children, requests over fresh connections (the
kernel spreads them over the children), then SIGKILL of one child and SIGTERM of the parent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import aiohttp
import orjson

from gateway.config import DEV_API_KEYS
from harness.system import System
from tests.integration.conftest import auth_body

API_KEY = DEV_API_KEYS.split(",")[0].split(":", 1)[1]


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its sockets, found in /proc/net/tcp)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:[") : -1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in sockets:  # 0A: LISTEN
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def gone(pids: list[int], timeout: float = 20.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while any(alive(pid) for pid in pids):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def authorize_on_fresh_connections(url: str, count: int) -> None:
    connector = aiohttp.TCPConnector(force_close=True)  # every request opens a new connection
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": uuid.uuid4().hex}
            async with session.post(f"{url}/v1/payments", json=auth_body(), headers=headers) as resp:
                assert resp.status == 202, await resp.text()


def pids_that_served(system: System) -> set[int]:
    pids = set()
    for line in system.log_lines('"request"', limit=100_000):
        record = orjson.loads(line.split(" ", 1)[1])
        if record.get("route") == "/v1/payments":
            pids.add(record["pid"])
    return pids


async def test_two_processes_share_the_port_and_go_down_together(server_urls, card_key):
    async with System(server_urls, card_key, api_args=["--workers", "2"], scale={"relay": 0, "worker": 0}) as system:
        await system.start("api")
        parent = system.procs["api"].pid
        children = children_of(parent)
        assert len(children) == 2

        await authorize_on_fresh_connections(system.api_url, 60)
        assert pids_that_served(system) == set(children)
        assert await system.pool.fetchval("SELECT count(*) FROM payments") == 60

        # Each process has an admin listener of its own (API_ADMIN_PORT + its index), so every
        # process's metrics can be scraped; the shared port serves none of them.
        public = system.ports["api"]
        admin_ports = {int(system.metrics_url("api", i).rsplit(":", 1)[1]) for i in range(2)}
        assert sorted(tuple(listening_ports(child) - {public}) for child in children) == sorted(
            (port,) for port in admin_ports
        )
        async with aiohttp.ClientSession() as session:
            served = 0.0
            for i in range(2):
                async with session.get(f"{system.metrics_url('api', i)}/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
                served += sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith('gateway_http_requests_total{method="POST",route="/v1/payments",status="202"}')
                )
            assert served == 60  # between them, the two processes counted every request
            async with session.get(f"{system.api_url}/metrics") as resp:
                assert resp.status == 404

        # One child dies: the parent stops the other and exits, so whatever runs it sees the
        # service down (and restarts it) instead of a half-served port.
        os.kill(children[0], signal.SIGKILL)
        assert await system.procs["api"].wait_exit(20) != 0
        assert await gone(children)

        await system.restart("api")
        parent = system.procs["api"].pid
        children = children_of(parent)
        assert len(children) == 2
        await authorize_on_fresh_connections(system.api_url, 4)
        # SIGTERM to the parent drains and stops every child; a clean stop exits 0.
        assert await system.terminate("api") == 0
        assert await gone(children)
