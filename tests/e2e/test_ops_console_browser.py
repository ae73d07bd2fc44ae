"""The ops console in a real browser, against the real processes.

A capture is parked while the bank is down (the stack's ladder is 1,2,4 s);
with the bank back, an operator logs in to /ops with headless Chromium, finds
the parked operation on the dead-letter page, replays it, and watches the
payment's timeline until it is captured. The stack is this module's own
(gateway-api started with GATEWAY_OPS_KEYS), on its own database and vhost.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page

from tests.e2e.browser import browser, needs_chromium
from tests.e2e.flows import bank_entries
from tests.e2e.stack import HAPPY, running_stack

pytestmark = [needs_chromium, pytest.mark.timeout(180)]

OPS_NAME = "night-shift"
OPS_KEY = "ops_e2e_key_5f0c2a9d41b7"
AMOUNT = 4321  # the only payment of this module's stack


@pytest.fixture(scope="module")
async def ops_stack(server_urls, card_key):
    async with running_stack(server_urls, card_key, gateway_env={"GATEWAY_OPS_KEYS": f"{OPS_NAME}:{OPS_KEY}"}) as s:
        yield s


async def parked_capture(stack) -> str:
    """An authorized payment whose capture is parked for ops; returns its id."""
    client = stack.client(patience=60)
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=AMOUNT, card=HAPPY)
    assert reply.status == 202, reply
    payment = await client.settled(reply.body["id"], timeout=30)
    assert payment["status"] == "authorized", payment
    # The bank up but failing this call: a bank that is down makes the worker wait, not park.
    await stack.bank.arm_fault(action="error", path="/api/v1/captures", status=500, times=1000)
    try:
        assert (await client.act(payment["id"], "capture")).status == 202
        deadline = time.monotonic() + 60
        while not (payment := await client.payment(payment["id"]))["attention_required"]:
            assert time.monotonic() < deadline, payment
            await asyncio.sleep(0.3)
        assert payment["status"] == "capturing"
    finally:
        await stack.bank.clear_faults()
    return payment["id"]


async def shut_out(page: Page, url: str) -> bool:
    """The page gets the 401 and not the console. Without credentials to try, headless Chromium
    abandons the Basic challenge (it shows no dialog); with wrong ones it shows the 401 page."""
    try:
        response = await page.goto(url)
    except PlaywrightError as exc:
        return "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
    return response is not None and response.status == 401 and await page.locator("nav").count() == 0


async def test_log_in_find_the_parked_operation_replay_it_and_see_the_payment_captured(ops_stack):
    payment_id = await parked_capture(ops_stack)
    console = f"{ops_stack.metrics_url('api')}/ops/"

    for password in (None, "ops_e2e_key_wrong_000000", "sk_test_ficmart_dev"):  # none, wrong, FicMart's key
        async with browser(username="ops", password=password) as stranger:
            assert await shut_out(await stranger.new_page(), console), password

    async with browser(username=OPS_NAME, password=OPS_KEY) as context:
        page = await context.new_page()
        response = await page.goto(console)
        assert response is not None and response.status == 200
        assert await page.locator(".who").inner_text() == OPS_NAME
        parked = page.locator("a.card", has_text="Parked operations")
        assert (await parked.locator(".value").inner_text()).strip() == "1"

        await parked.click()
        await page.wait_for_url("**/ops/dead-letters")
        row = page.locator("tr", has_text=payment_id)
        assert await row.count() == 1
        assert "capture" in await row.inner_text() and "parked" in await row.inner_text()
        await row.get_by_role("button", name="Replay").click()

        await page.wait_for_url("**/replay")
        result = page.locator("tr", has_text=payment_id)
        assert "replayed" in await result.inner_text()
        await result.get_by_role("link", name=payment_id).click()

        await page.wait_for_url(f"**/ops/payments/{payment_id}")
        deadline = time.monotonic() + 30
        while (status := (await page.locator(".status.big").inner_text()).strip()) != "captured":
            assert time.monotonic() < deadline, f"payment still {status}"
            await asyncio.sleep(0.5)
            await page.reload()
        history = await page.locator("section", has_text="History").inner_text()
        assert f"ops:{OPS_NAME}:replay" in history and "bank:capture:succeeded" in history
        assert "attention_required" not in await page.locator(".lead").inner_text()
        messages = await page.locator("table", has_text="routing key").inner_text()
        assert "nothing waiting" in messages  # the relay published (and deleted) the event

    payment = await ops_stack.client().payment(payment_id)
    assert (payment["status"], payment["attention_required"]) == ("captured", False)
    at_bank = bank_entries(await ops_stack.bank.ledger(), AMOUNT)
    assert len(at_bank["authorizations"]) == 1 and len(at_bank["captures"]) == 1  # once, at the bank too
    assert at_bank["captures"][0]["capture_id"] == payment["bank"]["capture_id"]
