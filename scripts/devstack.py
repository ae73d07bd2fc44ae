"""`make run`: the whole system on this machine, a short demo, then it stays up.

Creates the database and a dev card key if missing, applies the schema,
starts mockbank, gateway-api, gateway-relay and gateway-worker (logs in
.run/), walks one payment through authorize -> capture -> refund and shows
a decline, then keeps everything running until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import aiohttp
import asyncpg

from gateway.config import DEFAULTS, DEV_API_KEYS

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
ENV_FILE = ROOT / ".env"
BIN = Path(sys.executable).parent
API = "http://127.0.0.1:8080"
BANK = DEFAULTS["BANK_URL"]
DEV_KEY = DEV_API_KEYS.split(":", 1)[1]


def dev_environment() -> dict[str, str]:
    """os.environ plus .env, where `make run` keeps the generated dev card key."""
    if not ENV_FILE.exists():
        key = base64.b64encode(os.urandom(32)).decode()
        ENV_FILE.write_text(f"# made by make run: a development-only card encryption key\nCARD_ENCRYPTION_KEY={key}\n")
    env = dict(os.environ)
    for line in ENV_FILE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#"):
            env.setdefault(name.strip(), value.strip())
    return env


async def ensure_database(url: str) -> None:
    parts = urlparse(url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunparse(parts._replace(path="/postgres")))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
            print(f"created database {name}")
    finally:
        await admin.close()


def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    log = open(RUN_DIR / f"{name}.log", "ab")
    return subprocess.Popen([str(BIN / name), *args], env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_healthy(session: aiohttp.ClientSession, url: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}; see {RUN_DIR}/")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.3)
    raise SystemExit(f"{url} did not become ready; see logs in {RUN_DIR}/")


async def demo(session: aiohttp.ClientSession, api: str = API) -> None:
    headers = {"Authorization": f"Bearer {DEV_KEY}"}
    run = int(time.time())

    async def post(path: str, body: dict | None, key: str) -> dict:
        async with session.post(api + path, json=body, headers={**headers, "Idempotency-Key": key}) as resp:
            payment = await resp.json()
            print(f"  POST {path} -> {resp.status} {payment.get('status', payment)}")
            return payment

    async def settle(payment_id: str) -> dict:
        async with session.get(f"{api}/v1/payments/{payment_id}?wait=30", headers=headers) as resp:
            payment = await resp.json()
            print(f"  GET  /v1/payments/{payment_id}?wait=30 -> {payment['status']} {payment['bank']}")
            return payment

    card = {"number": "4111111111111111", "cvv": "123", "expiry_month": 12, "expiry_year": 2030}
    print("\n1. authorize $50.00 on the happy-path card")
    payment = await post(
        "/v1/payments",
        {"order_id": f"demo_{run}", "customer_id": "cus_demo", "amount": 5000, "currency": "USD", "card": card},
        f"demo-{run}-auth",
    )
    await settle(payment["id"])
    print("2. capture it")
    await post(f"/v1/payments/{payment['id']}/capture", None, f"demo-{run}-capture")
    await settle(payment["id"])
    print("3. refund it")
    await post(f"/v1/payments/{payment['id']}/refund", None, f"demo-{run}-refund")
    final = await settle(payment["id"])
    print("   history: " + " -> ".join(h["status"] for h in final["history"]))
    print("4. authorize on the card with no funds: declined")
    broke = {"number": "5555555555554444", "cvv": "789", "expiry_month": 9, "expiry_year": 2030}
    declined = await post(
        "/v1/payments",
        {"order_id": f"demo_{run}_b", "customer_id": "cus_demo", "amount": 1000, "currency": "USD", "card": broke},
        f"demo-{run}-decline",
    )
    result = await settle(declined["id"])
    print(f"   last_error: {result['last_error']}")


async def main() -> None:
    env = dev_environment()
    RUN_DIR.mkdir(exist_ok=True)
    await ensure_database(env.get("DATABASE_URL") or DEFAULTS["DATABASE_URL"])
    subprocess.run([str(BIN / "gatewayctl"), "migrate"], env=env, check=True)
    procs = [
        start("mockbank", [], env),
        start("gateway-relay", [], env),
        start("gateway-worker", [], env),
        start("gateway-api", [], env),
    ]
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, f"{BANK}/health", procs)
            await wait_healthy(session, f"{API}/readyz", procs)
            print(f"system up: mockbank {BANK}, API {API} (logs in .run/)")
            await demo(session)
        print(
            f"\nThe gateway is running. Try it:\n"
            f"  curl -H 'Authorization: Bearer {DEV_KEY}' '{API}/v1/payments?customer_id=cus_demo'\n"
            f"  API docs: {API}/docs\nCtrl-C stops everything."
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
