"""Load the mock bank under its DEFAULT chaos and report what a client observes.

    .venv/bin/python -m bench.mockbank_chaos [--requests 1000] [--concurrency 200] [--cards 20]
    .venv/bin/python -m bench.mockbank_chaos --url http://127.0.0.1:8787   # an already running bank

Without --url it starts its own ``mockbank`` (default chaos: 100-2000 ms,
FAILURE_RATE 0.05, no response loss) with MOCKBANK_EXTRA_ACCOUNTS=--cards, then
sends --requests authorizations on the generated accounts (round robin, so
many requests hit the same card at once) with at most --concurrency in
flight. It prints latency min/p50/p90/p99/max, the observed 500 rate with a
95% Wilson interval, and checks the books afterwards: one authorization per
200, and on every account held == sum of its holds and available ==
balance - held.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
import uuid
from collections import Counter, defaultdict

import aiohttp

from harness.mockbank_client import MockBankClient
from harness.procs import ScriptProcess, free_port
from mockbank.cards import extra_card

CHAOS_VARS = ("MIN_LATENCY_MS", "MAX_LATENCY_MS", "FAILURE_RATE", "RESPONSE_LOSS_RATE", "AUTH_EXPIRY_HOURS")


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run_load(base: str, requests: int, concurrency: int, cards: int) -> int:
    card_data = [extra_card(i) for i in range(cards)]
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    by_status: Counter[int | str] = Counter()  # HTTP status, or the client error's name
    approved_amounts: dict[str, int] = defaultdict(int)  # account_id -> sum of held amounts

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        bank = MockBankClient(base, session)
        accounts = await bank.accounts(offset=4, limit=cards)
        if len(accounts) < cards:
            print(f"bank has only {len(accounts)} extra accounts, need {cards}", file=sys.stderr)
            return 1
        assert accounts[0]["card_number"] == card_data[0]["card_number"]

        async def one(i: int) -> None:
            card = card_data[i % cards]
            amount = random.randint(1, 10_000)
            body = {k: card[k] for k in ("card_number", "cvv", "expiry_month", "expiry_year")}
            body["amount"] = amount
            headers = {"Idempotency-Key": f"bench-{uuid.uuid4()}"}
            async with sem:
                t0 = time.perf_counter()
                status: int | str
                try:
                    async with session.post(f"{base}/api/v1/authorizations", json=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                latencies.append(time.perf_counter() - t0)
            by_status[status] += 1
            if status == 200:
                approved_amounts[card["account_id"]] += amount

        t_start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t_start

        ledger = await bank.ledger("touched")

    lat = sorted(x * 1000 for x in latencies)
    n = len(lat)
    fails = by_status.get(500, 0)
    lo, hi = wilson(fails, n)
    print(f"requests {n}, concurrency {concurrency}, cards {cards}, wall {wall:.2f} s ({n / wall:.0f} req/s)")
    print("statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items(), key=str)))
    print(
        f"latency ms  min {lat[0]:.0f}  p50 {percentile(lat, 50):.0f}  p90 {percentile(lat, 90):.0f}"
        f"  p99 {percentile(lat, 99):.0f}  max {lat[-1]:.0f}"
    )
    print(f"500 rate {fails / n:.2%} ({fails}/{n}), 95% Wilson interval [{lo:.2%}, {hi:.2%}]")

    # Consistency of the books.
    problems = []
    auths = ledger["authorizations"]
    if len(auths) != by_status.get(200, 0):
        problems.append(f"{len(auths)} authorizations in the ledger but {by_status.get(200, 0)} answered 200")
    held: dict[str, int] = defaultdict(int)
    for a in auths:
        held[a["account_id"]] += a["amount"]
    for acct in ledger["accounts"]:
        if acct["kind"] != "extra":
            continue
        aid = acct["account_id"]
        if acct["held"] != held[aid] or acct["held"] != approved_amounts[aid]:
            problems.append(f"{aid}: held {acct['held']} vs holds {held[aid]} vs approved {approved_amounts[aid]}")
        if acct["available"] != acct["balance"] - acct["held"]:
            problems.append(f"{aid}: available != balance - held")
    print("books consistent" if not problems else "BOOKS INCONSISTENT:\n  " + "\n  ".join(problems))
    return 1 if problems else 0


async def main_async(args: argparse.Namespace) -> int:
    if args.url:
        return await run_load(args.url.rstrip("/"), args.requests, args.concurrency, args.cards)
    port = free_port()
    env: dict[str, str | None] = {name: None for name in CHAOS_VARS}  # default chaos, whatever the shell says
    env.update(MOCKBANK_EXTRA_ACCOUNTS=str(args.cards), LOG_LEVEL="warning")
    async with ScriptProcess("mockbank", "--port", str(port), env=env) as proc:
        await proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
        return await run_load(f"http://127.0.0.1:{port}", args.requests, args.concurrency, args.cards)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--cards", type=int, default=20, help="extra accounts to spread the load on")
    parser.add_argument("--url", help="use this running bank (needs >= --cards extra accounts)")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
