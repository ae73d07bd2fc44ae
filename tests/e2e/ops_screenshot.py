"""The README's picture of the ops console's overview, taken from a running system.

    .venv/bin/python -m tests.e2e.ops_screenshot [docs/ops-overview.png]

Starts the e2e stack (private database and vhost) with an ops key, puts a
realistic morning through it over HTTP (captures, voids, refunds, declines),
then the bank goes down: a capture and an authorization are parked, a few
authorizations wait in the retry ladder, the relay falls behind for a moment
(SIGSTOP) so the outbox has a backlog. The circuit breaker is not wired to
bank_circuit yet, so two workers' rows are recorded as a breaker would.
Then headless Chromium (tests/e2e/browser.py) photographs /ops/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from harness import services
from tests.e2e.browser import browser
from tests.e2e.stack import NO_FUNDS, Client, Stack

OPS_KEY = "ops_screenshot_key_0c1d2e3f"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "ops-overview.png"


async def _order(client: Client, card: dict, amount: int, then: tuple[str, ...]) -> str:
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=amount, card=card)
    assert reply.status == 202, reply
    payment = await client.settled(reply.body["id"], timeout=30)
    for action in then:
        if payment["status"] in ("declined",):
            break
        assert (await client.act(payment["id"], action)).status == 202
        payment = await client.settled(payment["id"], timeout=30)
    return payment["id"]


async def _flagged(client: Client, payment_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (await client.payment(payment_id))["attention_required"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{payment_id} was not parked within {timeout:g} s")
        await asyncio.sleep(0.3)


async def take(out: Path) -> None:
    with ExitStack() as resources:
        urls = services.server_urls(resources)
        card_key = base64.b64encode(os.urandom(32)).decode()
        stack = Stack(urls, card_key, gateway_env={"GATEWAY_OPS_KEYS": f"ops:{OPS_KEY}"})
        async with stack:
            client = stack.client(patience=60)
            cards = await stack.extra_cards(12)
            plans = [("capture",)] * 14 + [("capture", "refund")] * 4 + [("void",)] * 3 + [()] * 9
            await asyncio.gather(
                *(_order(client, cards[i % len(cards)], 1_000 + 137 * i, then) for i, then in enumerate(plans)),
                *(_order(client, NO_FUNDS, 90_000 + i, ()) for i in range(3)),
            )
            held = await _order(client, cards[0], 4_990, ())

            # The bank up but failing these calls (a bank that is down is waited for, not parked).
            for path in ("/api/v1/captures", "/api/v1/authorizations"):
                await stack.bank.arm_fault(action="error", path=path, status=500, times=10_000)
            assert (await client.act(held, "capture")).status == 202
            waiting = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=2_450, card=cards[1])
            await asyncio.gather(_flagged(client, held), _flagged(client, waiting.body["id"]))
            for i in range(3):  # in the retry ladder while the bank keeps failing
                await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=3_000 + i, card=cards[2])
            stack.pause("relay")  # the relay falls behind for a moment: an outbox backlog
            try:
                for i in range(4):
                    await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=5_000 + i, card=cards[3])
                await asyncio.sleep(3)
                async with browser(username="ops", password=OPS_KEY, viewport=(1360, 600)) as context:
                    page = await context.new_page()
                    response = await page.goto(f"{stack.metrics_url('api')}/ops/")
                    assert response is not None and response.status == 200, response
                    out.parent.mkdir(parents=True, exist_ok=True)
                    await page.screenshot(path=str(out), full_page=True)
            finally:
                stack.resume("relay")
                await stack.bank.chaos(down=False)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    asyncio.run(take(parser.parse_args().out))


if __name__ == "__main__":
    main()
