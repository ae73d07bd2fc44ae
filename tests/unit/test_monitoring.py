"""gateway.monitoring: the /metrics, /healthz and /readyz endpoint of gateway-worker and
gateway-relay, and the pool gauges."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway import monitoring
from harness.procs import free_port


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_metrics_health_and_readiness(http):
    registry = CollectorRegistry()
    Counter("gateway_things", "things", registry=registry).inc(3)
    checks = {"database": True, "broker": True}

    async def readiness() -> dict[str, bool]:
        return dict(checks)

    endpoint = monitoring.Endpoint(registry, readiness)
    port = free_port()
    await endpoint.start("127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            assert "gateway_things_total 3.0" in await resp.text()
        async with http.get(f"{base}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with http.get(f"{base}/readyz") as resp:
            body = {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
            assert (resp.status, await resp.json()) == (200, body)
        checks["broker"] = False
        async with http.get(f"{base}/readyz") as resp:
            body = {"status": "unavailable", "checks": {"database": "ok", "broker": "failed"}}
            assert (resp.status, await resp.json()) == (503, body)
        async with http.get(f"{base}/other") as resp:
            assert resp.status == 404
    finally:
        await endpoint.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{base}/healthz"):
            pass


async def test_a_taken_port_is_a_listen_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = monitoring.Endpoint(CollectorRegistry(), lambda: None)  # type: ignore[arg-type, return-value]
        with pytest.raises(monitoring.ListenError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await endpoint.start("127.0.0.1", port)


class FakePool:
    def __init__(self, size: int, idle: int, waiting: int):
        self._size, self._idle = size, idle
        self._queue = type("Queue", (), {"_getters": [FakeWaiter(False)] * waiting + [FakeWaiter(True)]})()

    def get_size(self) -> int:
        return self._size

    def get_idle_size(self) -> int:
        return self._idle


class FakeWaiter:
    def __init__(self, done: bool):
        self._done = done

    def done(self) -> bool:
        return self._done


def test_pool_gauges_read_the_pool_at_each_scrape():
    registry = CollectorRegistry()
    pool: list = [None]
    monitoring.pool_gauges(registry, lambda: pool[0])
    assert registry.get_sample_value("gateway_db_pool_in_use") == 0  # not started yet
    assert registry.get_sample_value("gateway_db_pool_waiting") == 0
    pool[0] = FakePool(size=10, idle=3, waiting=2)
    assert registry.get_sample_value("gateway_db_pool_in_use") == 7
    assert registry.get_sample_value("gateway_db_pool_waiting") == 2  # a waiter already served does not count
