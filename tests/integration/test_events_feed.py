"""GET /v1/events: the events feed, its cursor, its bounds, its long poll and its retention.

No relay runs here, so the outbox still holds every event: the feed's bodies are
compared with the outbox rows the relay would publish.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import orjson
import pytest
from jsonschema import Draft202012Validator

from gateway import feed, messages
from gateway.timefmt import now
from tests.integration.conftest import OTHER_KEY, Api, captured, settle
from worker import sweeper

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]


async def read_all(api: Api, after: str | None = None, limit: int = 100) -> tuple[list[dict], str | None]:
    """Every event after `after`, page by page; and the last cursor."""
    events: list[dict] = []
    while True:
        params = {"limit": str(limit), **({"after": after} if after else {})}
        resp, page = await api.get("/v1/events", params=params)
        assert resp.status == 200, page
        events += page["data"]
        after = page["next_after"]
        if not page["has_more"]:
            return events, after


def of_payment(events: list[dict], payment_id: str) -> list[str]:
    return [e["type"] for e in events if e["payment"]["id"] == payment_id]


async def eventually(check, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


async def test_a_lifecycle_shows_in_order_with_the_bodies_rabbitmq_gets(api, api_client, pool):
    _, start = await read_all(api)
    payment = await captured(api, pool)
    events, _ = await eventually(lambda: _at_least(api, start, payment["id"], 2))
    assert of_payment(events, payment["id"]) == ["payment.authorized", "payment.captured"]
    mine = [e for e in events if e["payment"]["id"] == payment["id"]]
    for event in mine:
        outbox = await pool.fetchval("SELECT body FROM outbox WHERE message_id = $1", event["event_id"])
        assert orjson.loads(outbox) == event  # same body as the RabbitMQ message
        assert event["merchant"] == "ficmart"
    doc = await (await api_client.get("/openapi.json")).json()
    defs = orjson.loads(orjson.dumps(doc["components"]["schemas"]).replace(b"#/components/schemas/", b"#/$defs/"))
    _resp, page = await api.get("/v1/events", params={"after": start} if start else {})
    Draft202012Validator({"$defs": defs, "$ref": "#/$defs/EventList"}).validate(page)


async def _at_least(api: Api, after: str | None, payment_id: str, count: int):
    events, cursor = await read_all(api, after)
    return (events, cursor) if len(of_payment(events, payment_id)) >= count else None


async def test_pages_follow_the_cursor_with_has_more(api, pool):
    _, start = await read_all(api)
    payments = [await captured(api, pool) for _ in range(3)]  # six events
    ids = {p["id"] for p in payments}
    whole, _ = await eventually(lambda: _at_least(api, start, payments[-1]["id"], 2))
    paged, _ = await read_all(api, start, limit=2)
    assert [e["event_id"] for e in paged] == [e["event_id"] for e in whole]
    assert sum(e["payment"]["id"] in ids for e in paged) == 6
    resp, page = await api.get("/v1/events", params={"after": paged[-1]["event_id"]})
    assert resp.status == 200 and page == {"data": [], "has_more": False, "next_after": paged[-1]["event_id"]}


async def test_a_cursor_never_skips_an_event_committed_late(pool):
    """Two transactions: the one writing the later row commits first. Ordering by row id would
    hand the later row out, move the cursor past the earlier one, and never show it."""
    merchant = f"late-{uuid.uuid4().hex[:8]}"
    insert = "INSERT INTO outbox (exchange, routing_key, message_id, body, headers) VALUES ($1, $2, $3, $4, $5)"

    def event(n: int) -> messages.OutboxMessage:
        return messages.event("payment.authorized", {"id": f"pay_{n}"}, now(), merchant=merchant)

    first, second = event(1), event(2)
    async with pool.acquire() as early, pool.acquire() as late:
        slow = early.transaction()
        await slow.start()
        await early.execute(insert, first.exchange, first.routing_key, first.message_id, first.body, first.headers)
        async with late.transaction():
            await late.execute(
                insert, second.exchange, second.routing_key, second.message_id, second.body, second.headers
            )
        assert await pool.fetchval("SELECT count(*) FROM events WHERE merchant = $1", merchant) == 1
        while_open = await feed.read(pool, merchant, after=None, limit=10)
        await slow.commit()
    # Read on from the cursor as a client would (other transactions on the server may hold
    # the horizon between the two for a moment): both come, in commit order, none skipped.
    seen = [orjson.loads(b)["event_id"] for b in while_open.bodies]
    after = while_open.next_after
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        page = await feed.read(pool, merchant, after=after, limit=10)
        seen += [orjson.loads(b)["event_id"] for b in page.bodies]
        after = page.next_after
        await asyncio.sleep(0.05)
    assert seen == [first.message_id, second.message_id]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"limit": "-1"},
        {"wait": "31"},
        {"after": "pay_" + "0" * 32},
        {"after": "evt_short"},
        {"before": "evt_" + "0" * 32},
        {"wait": "nan"},
        {"wait": "inf"},
        {"limit": "1e3"},
        {"limit": "99999999999999999999999"},
        {"after": "evt_" + "g" * 32},
        {"after": "evt_" + "0" * 32 + "\u00e9"},
    ],
)
async def test_bad_query_is_refused(api, params):
    resp, err = await api.get("/v1/events", params=params)
    assert resp.status == 422 and err["error"]["code"] == "validation_error", err


async def test_limit_bounds_are_served(api, pool):
    await captured(api, pool)
    for limit in (1, 100):
        resp, page = await api.get("/v1/events", params={"limit": str(limit)})
        assert resp.status == 200 and 1 <= len(page["data"]) <= limit


async def test_a_merchant_sees_only_its_own_events(api, api_client, pool):
    other = Api(api_client, OTHER_KEY)
    _, start = await read_all(other)
    ours = await captured(api, pool)
    theirs = await other.authorize()
    await settle(pool, theirs["id"])
    events, _ = await eventually(lambda: _at_least(other, start, theirs["id"], 1))
    assert {e["merchant"] for e in events} == {"other"}
    assert of_payment(events, ours["id"]) == []
    mine, _ = await read_all(api)
    resp, err = await other.get("/v1/events", params={"after": mine[-1]["event_id"]})
    assert resp.status == 404 and err["error"]["code"] == "event_not_found"


async def test_unknown_cursor_is_404(api):
    resp, err = await api.get("/v1/events", params={"after": f"evt_{uuid.uuid4().hex}"})
    assert resp.status == 404 and err["error"] == {**err["error"], "code": "event_not_found", "param": "after"}


async def test_long_poll_answers_when_the_next_event_arrives(api, pool):
    _, start = await read_all(api)
    payment = await api.authorize()

    async def worker():
        await asyncio.sleep(0.5)
        await settle(pool, payment["id"])

    started = time.monotonic()
    (resp, page), _ = await asyncio.gather(
        api.get("/v1/events", params={"wait": "10", **({"after": start} if start else {})}), worker()
    )
    assert resp.status == 200 and [e["payment"]["id"] for e in page["data"]] == [payment["id"]]
    assert 0.4 < time.monotonic() - started < 8

    started = time.monotonic()
    resp, page = await api.get("/v1/events", params={"wait": "1", "after": page["next_after"]})
    assert resp.status == 200 and page["data"] == [] and 0.9 < time.monotonic() - started < 5


async def test_events_past_the_retention_are_pruned_in_batches(pool):
    merchant = f"old-{uuid.uuid4().hex[:8]}"
    await pool.execute(
        """INSERT INTO events (merchant, event_id, body, created_at)
           SELECT $1, 'evt_' || md5($1 || g), '{}'::bytea,
                  now() - make_interval(days => CASE WHEN g <= 25 THEN 31 ELSE 29 END)
             FROM generate_series(1, 30) AS g""",
        merchant,
    )
    pruned = await sweeper.prune_events(pool, timedelta(days=30), batch=10)
    assert pruned >= 25  # other tests' rows are young: only these are that old
    left = await pool.fetchval("SELECT count(*) FROM events WHERE merchant = $1", merchant)
    assert left == 5
