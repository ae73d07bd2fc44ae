"""Admission through HTTP: what the gateway can finish is taken; a refusal (503 at a bound,
429 for a caller over its share or rate) comes at once, with Retry-After, having done
nothing, so the same request may be sent again.

Requests are held in flight by starving the app's own one-connection pool: they wait for it
exactly as they would for a Postgres that cannot keep up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from gateway import db
from gateway.api import server
from gateway.api.admission import Admission
from gateway.api.app import _parse_args, create_app
from gateway.api.middleware import ADMISSION, REFUSALS
from tests.integration.conftest import API_KEY, OTHER_KEY, Api, auth_body, metrics_text, settle


class _ServedAsInProduction(TestServer):
    """The app behind gateway-api's own Runner (aiohttp's test server cancels a handler whose
    client went away; the production server does not, except for parked long polls)."""

    async def _make_runner(self, **kwargs):
        return server.Runner(self.app)


@contextlib.asynccontextmanager
async def gateway(api_settings, database_url, *, backlog: bool = False, **limits):
    """An API with the given admission limits over a one-connection pool; yields (client, pool).
    Without `backlog` its probe does not run (the backlog reads 0): the test database holds
    other tests' operations, which would count against small bounds."""
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    admission = Admission(
        **{
            "max_in_flight": 2,
            "max_long_polls": 10,
            "max_time_to_final": 30,
            "post_rate": 10**6,
            **limits,
        }
    )
    if not backlog:
        admission.start = lambda *_: None  # type: ignore[method-assign]
    try:
        async with TestClient(_ServedAsInProduction(create_app(api_settings, pool, admission=admission))) as client:
            yield client, pool
    finally:
        await pool.close()


async def until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never true: {what}")


async def held_posts(api: Api, count: int, admission_of) -> tuple[list[asyncio.Task], list[str]]:
    """`count` authorizations started while the pool's one connection is held: they stay in flight."""
    keys = [uuid.uuid4().hex for _ in range(count)]
    tasks = [asyncio.create_task(api.post("/v1/payments", auth_body(), key=key)) for key in keys]
    await until(lambda: admission_of().in_flight >= count, f"{count} requests in flight")
    return tasks, keys


def retry_after(resp) -> int:
    seconds = int(resp.headers["Retry-After"])
    assert seconds >= 1
    return seconds


async def test_a_same_key_burst_on_an_idle_gateway_makes_one_payment_and_no_refusal(api, pool):
    """20 concurrent POSTs with one Idempotency-Key: one 202 makes the payment; the others get
    409 request_in_progress while it is being recorded, or, once it is, its stored 202 again
    (Idempotent-Replayed: the same payment). Nothing else: no 503."""
    body, key = auth_body(), f"burst-{uuid.uuid4().hex}"
    answers = await asyncio.gather(*(api.post("/v1/payments", body, key=key) for _ in range(20)))
    made = [answer for resp, answer in answers if resp.status == 202 and "Idempotent-Replayed" not in resp.headers]
    replayed = [answer for resp, answer in answers if resp.headers.get("Idempotent-Replayed") == "true"]
    in_progress = [answer for resp, answer in answers if resp.status == 409]
    assert len(made) == 1, [resp.status for resp, _ in answers]
    assert len(made) + len(replayed) + len(in_progress) == 20, [resp.status for resp, _ in answers]
    assert all(answer["id"] == made[0]["id"] for answer in replayed)
    assert {answer["error"]["code"] for answer in in_progress} <= {"request_in_progress"}
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", body["order_id"]) == 1
    await settle(pool, made[0]["id"])


async def test_at_the_memory_bound_a_request_gets_503_with_retry_after_and_nothing_is_stored(
    api_settings, database_url, pool, api_logs
):
    async with gateway(api_settings, database_url) as (client, small_pool):
        api = Api(client)
        admission = client.server.app[ADMISSION]
        body = auth_body()
        async with small_pool.acquire():
            held, _ = await held_posts(api, 2, lambda: admission)
            logged_before = len(api_logs.getvalue())
            resp, refused = await api.post("/v1/payments", body, key="shed-once")
            assert resp.status == 503, refused
            retry_after(resp)
            assert refused["error"]["code"] == "service_unavailable"
            # Counted, not logged one by one: a line a second says how many, by reason.
            assert resp.headers["X-Request-Id"] not in api_logs.getvalue()[logged_before:]
            client.server.app[REFUSALS].flush()
            summary = [json.loads(line) for line in api_logs.getvalue()[logged_before:].splitlines()]
            assert [(s["event"], s["overload"]) for s in summary] == [("requests refused for load", 1)]
        for task in held:
            resp, _ = await task
            assert resp.status == 202
        stored = await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", body["order_id"])
        assert stored == 0
        # The same request with the same key, once there is room, is simply accepted.
        resp, accepted = await api.post("/v1/payments", body, key="shed-once")
        assert resp.status == 202, accepted
        metrics = metrics_text(client)
        assert 'gateway_http_requests_refused_total{reason="overload"} 1.0' in metrics


async def test_the_caller_over_its_share_gets_429_while_another_is_still_served(api_settings, database_url):
    async with gateway(api_settings, database_url) as (client, small_pool):
        greedy, quiet = Api(client), Api(client, OTHER_KEY)
        admission = client.server.app[ADMISSION]
        async with small_pool.acquire():
            held, _ = await held_posts(greedy, 2, lambda: admission)
            quiet_task = asyncio.create_task(quiet.post("/v1/payments", auth_body()))
            await until(lambda: admission.in_flight == 3, "the quiet caller's request in flight")
            resp, refused = await greedy.post("/v1/payments", auth_body())
            assert resp.status == 429, refused
            retry_after(resp)
            assert refused["error"]["code"] == "too_many_requests"
        for task in [*held, quiet_task]:
            resp, body = await task
            assert resp.status == 202, body


async def test_a_caller_over_its_rate_gets_429_and_another_caller_does_not(api_settings, database_url, pool):
    # 0.2 POSTs a second: a bucket of one, refilled in 5 s.
    async with gateway(api_settings, database_url, max_in_flight=100, post_rate=0.2) as (client, _):
        api, other = Api(client), Api(client, OTHER_KEY)
        await api.authorize()
        body = auth_body()
        resp, refused = await api.post("/v1/payments", body)
        assert resp.status == 429, refused
        assert refused["error"]["code"] == "too_many_requests"
        assert retry_after(resp) >= 4  # about 5 s until the next token
        assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", body["order_id"]) == 0
        await other.authorize()
        metrics = metrics_text(client)
        assert 'gateway_http_requests_refused_total{reason="rate"} 1.0' in metrics


async def test_waiting_long_polls_do_not_hold_room_but_have_their_own_cap(api_settings, database_url, pool):
    async with gateway(api_settings, database_url, max_in_flight=1, max_long_polls=1) as (client, _):
        api = Api(client)
        admission = client.server.app[ADMISSION]
        payment = await api.authorize()
        waiting = asyncio.create_task(api.get(f"/v1/payments/{payment['id']}", params={"wait": "10"}))
        await until(lambda: admission.waiting == 1, "the long poll waiting")
        assert admission.in_flight == 0
        resp, body = await api.get(f"/v1/payments/{payment['id']}")  # room: the waiting poll holds none
        assert resp.status == 200, body
        resp, body = await api.get(f"/v1/payments/{payment['id']}", params={"wait": "10"})
        assert resp.status == 503, body
        retry_after(resp)
        await settle(pool, payment["id"])
        resp, body = await waiting
        assert resp.status == 200 and body["status"] == "authorized", body
        assert admission.in_flight == 0 and admission.waiting == 0


async def test_a_long_poll_whose_client_went_away_frees_its_place(api_settings, database_url, pool):
    async with gateway(api_settings, database_url, max_in_flight=10) as (client, _):
        payment = await Api(client).authorize()
        admission = client.server.app[ADMISSION]
        url = client.make_url(f"/v1/payments/{payment['id']}")
        async with ClientSession() as session:
            gone = asyncio.create_task(
                session.get(url, params={"wait": "30"}, headers={"Authorization": f"Bearer {API_KEY}"})
            )
            await until(lambda: admission.waiting == 1, "the long poll waiting")
        # The session is closed: its connection with it. The place is free long before 30 s.
        await until(lambda: admission.waiting == 0, "the long poll ended with its client")
        assert admission.in_flight == 0
        with contextlib.suppress(Exception):
            await gone
        await settle(pool, payment["id"])


async def test_past_the_backlog_bound_new_work_gets_503_and_reads_are_still_served(api_settings, database_url, pool):
    async with gateway(api_settings, database_url, backlog=True, max_in_flight=100) as (client, _):
        api = Api(client)
        admission = client.server.app[ADMISSION]
        waiting = await pool.fetchval("SELECT count(*) FROM operations WHERE status = 'pending' AND NOT parked")
        # Nothing finishes here (no worker): the bound is max_in_flight, which two more fill.
        admission.max_in_flight = waiting + 2
        first, second = await api.authorize(), await api.authorize()
        await until(lambda: admission.backlog >= waiting + 2, "the probe seeing the backlog")
        body = auth_body()
        resp, refused = await api.post("/v1/payments", body, key="over-backlog")
        assert resp.status == 503, refused
        retry_after(resp)
        resp, read = await api.get(f"/v1/payments/{first['id']}")
        assert resp.status == 200, read
        assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", body["order_id"]) == 0
        await settle(pool, first["id"])
        await settle(pool, second["id"])
        await until(lambda: admission.backlog < waiting + 2, "the probe seeing room again")
        resp, accepted = await api.post("/v1/payments", body, key="over-backlog")
        assert resp.status == 202, accepted
        await settle(pool, accepted["id"])
        metrics = metrics_text(client)
        assert 'gateway_http_requests_refused_total{reason="backlog"} 1.0' in metrics


@pytest.mark.parametrize(
    "argv",
    [
        ["--workers", "0"],
        ["--max-in-flight", "0"],
        ["--max-long-polls", "0"],
        ["--max-time-to-final", "0"],
        ["--post-rate", "0"],
        ["--post-rate", "inf"],
    ],
)
def test_the_cli_refuses_nonsense_limits(argv, capsys):
    with pytest.raises(SystemExit):
        _parse_args(argv)
    assert "must be" in capsys.readouterr().err


async def test_a_backlog_held_by_an_open_bank_circuit_does_not_shed_new_work(api_settings, database_url, pool):
    """Payments taken while the bank is away wait for it, not for our CPU: with a worker reporting
    its circuit open the backlog bound does not apply; a report older than 3 minutes is not believed."""
    worker_id = f"test-{uuid.uuid4().hex[:8]}"
    report = "INSERT INTO bank_circuit (worker_id, open, changed_at) VALUES ($1, true, now() - interval '4 minutes')"
    async with gateway(api_settings, database_url, backlog=True, max_in_flight=100) as (client, _):
        api = Api(client)
        admission = client.server.app[ADMISSION]
        waiting = await pool.fetchval("SELECT count(*) FROM operations WHERE status = 'pending' AND NOT parked")
        admission.max_in_flight = waiting + 1
        first = await api.authorize()
        try:
            await pool.execute(report, worker_id)  # stale: a worker long gone
            await until(lambda: admission.backlog >= waiting + 1, "the probe seeing the backlog")
            resp, refused = await api.post("/v1/payments", auth_body(), key="stale-circuit")
            assert resp.status == 503, refused
            await pool.execute("UPDATE bank_circuit SET changed_at = now() WHERE worker_id = $1", worker_id)
            await until(lambda: admission.backlog == 0, "the probe seeing the open circuit")
            resp, accepted = await api.post("/v1/payments", auth_body(), key="open-circuit")
            assert resp.status == 202, accepted
            await settle(pool, accepted["id"])
        finally:
            await pool.execute("DELETE FROM bank_circuit WHERE worker_id = $1", worker_id)
        await settle(pool, first["id"])
