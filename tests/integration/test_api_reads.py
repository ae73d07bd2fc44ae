"""GET /v1/payments/{id} (with long poll) and GET /v1/payments (lists, pagination)."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from gateway import views
from gateway.api.longpoll import APPLICATION_NAME
from gateway.api.routes import STATE
from gateway.domain import Verdict
from gateway.payments import settlement
from tests.integration.conftest import OTHER_KEY, Api, authorized, pending_operation, settle
from tests.support import phases

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_get_payment(api):
    payment = await api.authorize()
    resp, body = await api.get(f"/v1/payments/{payment['id']}")
    assert resp.status == 200 and body == payment


@pytest.mark.parametrize("payment_id", ["pay_" + "f" * 32, "pay_x", "nope", "pay_" + "F" * 32])
async def test_get_unknown_is_404(api, payment_id):
    resp, err = await api.get(f"/v1/payments/{payment_id}")
    assert resp.status == 404 and err["error"]["code"] == "payment_not_found"


# ---- long poll ----


async def test_long_poll_returns_when_the_worker_settles(api, pool):
    payment = await api.authorize()
    op = await pending_operation(pool, payment["id"])

    async def worker():
        await asyncio.sleep(0.3)
        claimed = await phases.claim(pool, op, "test-worker", 30)
        assert isinstance(claimed, settlement.Claim)
        await asyncio.sleep(0.2)  # the claim updates operations only: no wake-up for that
        await settle(pool, payment["id"])

    started = time.monotonic()
    (resp, body), _ = await asyncio.gather(api.get(f"/v1/payments/{payment['id']}", params={"wait": "10"}), worker())
    elapsed = time.monotonic() - started
    assert resp.status == 200 and body["status"] == "authorized"
    assert 0.4 < elapsed < 3, elapsed


async def test_long_poll_times_out_with_the_payment_as_it_is(api):
    payment = await api.authorize()
    started = time.monotonic()
    resp, body = await api.get(f"/v1/payments/{payment['id']}", params={"wait": "1"})
    elapsed = time.monotonic() - started
    assert resp.status == 200 and body["status"] == "pending"
    assert 0.9 < elapsed < 2.5, elapsed


async def test_long_poll_answers_at_once_when_not_in_progress(api, pool):
    payment = await authorized(api, pool)
    started = time.monotonic()
    resp, body = await api.get(f"/v1/payments/{payment['id']}", params={"wait": "30"})
    assert resp.status == 200 and body["status"] == "authorized"
    assert time.monotonic() - started < 1


async def test_long_poll_unknown_payment_is_404_at_once(api):
    started = time.monotonic()
    resp, _ = await api.get(f"/v1/payments/pay_{uuid.uuid4().hex}", params={"wait": "30"})
    assert resp.status == 404 and time.monotonic() - started < 1


async def test_long_poll_ignores_other_payments_and_keeps_waiting(api, pool):
    watched, other = await api.authorize(), await api.authorize()

    async def noise_then_settle():
        await asyncio.sleep(0.2)
        await settle(pool, other["id"])  # a notification for another payment
        await asyncio.sleep(0.3)
        await settle(pool, watched["id"])

    started = time.monotonic()
    (_resp, body), _ = await asyncio.gather(
        api.get(f"/v1/payments/{watched['id']}", params={"wait": "10"}), noise_then_settle()
    )
    assert body["status"] == "authorized" and time.monotonic() - started >= 0.5


async def test_many_long_polls_on_one_payment_all_wake(api, pool):
    payment = await authorized(api, pool)
    _resp, body = await api.post(f"/v1/payments/{payment['id']}/capture")
    assert body["status"] == "capturing"

    async def worker():
        await asyncio.sleep(0.3)
        await settle(pool, payment["id"])

    results = await asyncio.gather(
        *(api.get(f"/v1/payments/{payment['id']}", params={"wait": "10"}) for _ in range(20)), worker()
    )
    assert all(b["status"] == "captured" for _, b in results[:-1])


async def test_no_lost_wakeup_between_read_and_wait(api, api_client, pool):
    """The change lands after the read and before the wait: the waiter registered first, so it wakes."""
    watcher = api_client.server.app[STATE].watcher
    payment = await api.authorize()
    watcher._wake_all()  # as after a reconnect: this process no longer counts on having accepted it
    reads = 0

    async def read():
        nonlocal reads
        reads += 1
        current = await views.get_payment(pool, "ficmart", payment["id"])
        if reads == 1:
            await settle(pool, payment["id"])
        return current

    started = time.monotonic()
    result = await watcher.wait_settled(payment["id"], "ficmart", read, 5)
    # The wake-up carried the payment as GET shows it: no second read.
    assert isinstance(result, bytes) and reads == 1
    assert orjson.loads(result) == await views.get_payment(pool, "ficmart", payment["id"])
    assert orjson.loads(result)["status"] == "authorized"
    assert time.monotonic() - started < 2


async def test_a_long_poll_after_this_processs_own_202_reads_nothing(api, api_client, pool):
    """Submit then wait, as FicMart does: the process knows it just accepted the payment
    (pending), so the wait starts without a read and ends with the wake-up's payment; a
    later wait reads (nothing is answered from memory); another merchant's wait reads (404)."""
    watcher = api_client.server.app[STATE].watcher
    payment = await api.authorize()
    reads = 0

    async def read():
        nonlocal reads
        reads += 1
        return await views.get_payment(pool, "ficmart", payment["id"])

    waiting = asyncio.create_task(watcher.wait_settled(payment["id"], "ficmart", read, 5))
    await asyncio.sleep(0.1)
    await settle(pool, payment["id"])
    result = await waiting
    assert reads == 0 and isinstance(result, bytes) and orjson.loads(result)["status"] == "authorized"
    assert await watcher.wait_settled(payment["id"], "ficmart", read, 5) == orjson.loads(result) and reads == 1

    async def elsewhere():
        return await views.get_payment(pool, "other", payment["id"])

    assert await watcher.wait_settled(payment["id"], "other", elsewhere, 5) is None


async def test_a_long_poll_after_a_capture_sees_it(api, api_client, pool):
    """After a capture request the payment is capturing: never an earlier state from memory."""
    payment = await api.authorize()
    await settle(pool, payment["id"])
    resp, body = await api.get(f"/v1/payments/{payment['id']}", params={"wait": "5"})
    assert body["status"] == "authorized"
    resp, _ = await api.post(f"/v1/payments/{payment['id']}/capture")
    assert resp.status == 202
    await asyncio.sleep(0.2)  # the capture's wake-up (the trigger's, id only) reaches the listener
    resp, body = await api.get(f"/v1/payments/{payment['id']}", params={"wait": "1"})
    assert body["status"] == "capturing"


async def test_long_poll_survives_losing_the_listen_connection(api, api_client, pool):
    watcher = api_client.server.app[STATE].watcher
    assert watcher.listening
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = $1 AND datname = current_database()",
        APPLICATION_NAME,
    )
    assert killed >= 1
    payment = await api.authorize()

    async def worker():
        await asyncio.sleep(0.5)
        await settle(pool, payment["id"])

    (_resp, body), _ = await asyncio.gather(api.get(f"/v1/payments/{payment['id']}", params={"wait": "10"}), worker())
    assert body["status"] == "authorized"
    for _ in range(50):
        if watcher.listening:
            break
        await asyncio.sleep(0.1)
    assert watcher.listening


async def test_parked_operation_is_still_in_progress_but_flagged(api, pool):
    payment = await api.authorize()
    op = await pending_operation(pool, payment["id"])
    await settlement.park(pool, op, {"code": "bank_timeout", "message": "the bank did not answer", "retryable": True})
    _resp, body = await api.get(f"/v1/payments/{payment['id']}", params={"wait": "0.5"})
    assert body["status"] == "pending" and body["attention_required"] is True
    assert body["last_error"]["code"] == "bank_timeout"


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "nan", "inf"])
async def test_bad_wait_is_422(api, wait):
    payment = await api.authorize()
    resp, err = await api.get(f"/v1/payments/{payment['id']}", params={"wait": wait})
    assert resp.status == 422 and err["error"]["code"] == "validation_error"
    assert err["error"]["details"][0]["field"] == "wait"


# ---- lists ----


async def _walk(api, params: dict) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        query = {**params, **({"starting_after": cursor} if cursor else {})}
        resp, page = await api.get("/v1/payments", params=query)
        assert resp.status == 200, page
        pages.append([p["id"] for p in page["data"]])
        if not page["has_more"]:
            return pages
        cursor = page["data"][-1]["id"]


async def test_list_by_customer_paginates_newest_first(api):
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    made = [(await api.authorize(customer_id=customer))["id"] for _ in range(7)]
    pages = await _walk(api, {"customer_id": customer, "limit": "3"})
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == made[::-1]
    _resp, page = await api.get("/v1/payments", params={"customer_id": customer})
    assert len(page["data"]) == 7 and page["has_more"] is False  # default limit 10


async def test_list_by_order(api, pool):
    order = f"ord_{uuid.uuid4().hex[:12]}"
    ids = []
    for _ in range(3):  # declined attempts leave room for the next one
        payment = await api.authorize(order_id=order)
        ids.append(payment["id"])
        await settle(pool, payment["id"], Verdict.REFUSED)
    pages = await _walk(api, {"order_id": order, "limit": "2"})
    assert pages == [ids[::-1][:2], ids[::-1][2:]]


async def test_list_exact_page_boundary_has_no_more(api):
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    for _ in range(2):
        await api.authorize(customer_id=customer)
    _resp, page = await api.get("/v1/payments", params={"customer_id": customer, "limit": "2"})
    assert len(page["data"]) == 2 and page["has_more"] is False


async def test_list_empty(api):
    resp, page = await api.get("/v1/payments", params={"order_id": "ord_never_seen"})
    assert resp.status == 200 and page == {"data": [], "has_more": False}


async def test_list_is_scoped_to_the_caller(api, api_client):
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    await api.authorize(customer_id=customer)
    _resp, page = await Api(api_client, OTHER_KEY).get("/v1/payments", params={"customer_id": customer})
    assert page["data"] == []


async def test_unknown_cursor_is_404(api):
    resp, err = await api.get("/v1/payments", params={"customer_id": "c", "starting_after": "pay_" + "a" * 32})
    assert resp.status == 404 and err["error"]["code"] == "payment_not_found"
    assert err["error"]["param"] == "starting_after"


@pytest.mark.parametrize(
    "params,field",
    [
        ({}, "query"),
        ({"order_id": "o", "customer_id": "c"}, "query"),
        ({"customer_id": "c", "limit": "0"}, "limit"),
        ({"customer_id": "c", "limit": "101"}, "limit"),
        ({"customer_id": "c", "limit": "ten"}, "limit"),
        ({"customer_id": "c", "starting_after": "cus_1"}, "starting_after"),
        ({"order_id": ""}, "order_id"),
        ({"custmer_id": "c"}, "custmer_id"),
    ],
    ids=["no filter", "two filters", "limit 0", "limit 101", "limit word", "bad cursor", "empty order", "misspelt"],
)
async def test_bad_list_queries_are_422(api, params, field):
    resp, err = await api.get("/v1/payments", params=params)
    assert resp.status == 422 and err["error"]["code"] == "validation_error"
    assert err["error"]["details"][0]["field"] == field


async def test_duplicate_query_parameters_are_422(api):
    resp, err = await api.get("/v1/payments?customer_id=cus_a&customer_id=cus_b")
    assert resp.status == 422 and err["error"]["code"] == "validation_error"
    assert err["error"]["details"] == [
        {"field": "query.customer_id", "code": "duplicate", "message": "given more than once"}
    ]
    resp, err = await api.get(f"/v1/payments/pay_{uuid.uuid4().hex}?wait=1&wait=30")
    assert resp.status == 422 and err["error"]["details"][0]["field"] == "query.wait"
