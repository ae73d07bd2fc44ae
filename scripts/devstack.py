"""`make run`: the whole system on this machine, a short demo, then it stays up.

Creates the database and a dev card key (in .env) if missing, applies the schema,
starts mockbank, gateway-api, gateway-relay, gateway-worker and gateway-webhooks through the
system harness (harness/system.py; logs in .run/<process>.log), walks one payment
through authorize -> capture -> refund and shows a decline, then keeps everything
running until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from gateway.config import DEV_API_KEYS, Settings
from harness import services
from harness.procs import ProcessError
from harness.system import System

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
ENV_FILE = ROOT / ".env"
API_PORT = 8080
# The processes' defaults.
API_ADMIN_PORT, WORKER_METRICS_PORT, RELAY_METRICS_PORT, WEBHOOK_METRICS_PORT = 9100, 9101, 9102, 9103
DEV_KEY = DEV_API_KEYS.split(":", 1)[1]
DEFAULTS = {name: default for name, default, _ in Settings.variables()}  # variable -> default as written


def dev_environment() -> dict[str, str]:
    """.env's settings that the environment does not override; `make run` keeps the
    generated dev card key there (compose reads the same file), readable by the owner alone."""
    if not ENV_FILE.exists():
        key = base64.b64encode(os.urandom(32)).decode()
        # Secrets: readable by the owner alone, from the moment the file exists.
        fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as env_file:
            env_file.write(
                "# made by make run: development mode, the documented API key and a card key of this machine\n"
                f"GATEWAY_ENV=development\nGATEWAY_API_KEYS={DEV_API_KEYS}\nCARD_ENCRYPTION_KEY={key}\n"
            )
    elif ENV_FILE.stat().st_mode & 0o077:
        ENV_FILE.chmod(0o600)  # one written before make run did this, or by hand
    settings = {}
    for line in ENV_FILE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#") and name.strip() not in os.environ:
            settings[name.strip()] = value.strip()
    return settings


async def demo(session: aiohttp.ClientSession, api: str) -> None:
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
    dotenv = dev_environment()

    def setting(name: str) -> str:
        return os.environ.get(name) or dotenv.get(name) or DEFAULTS[name]

    database_url = setting("DATABASE_URL")
    if await services.ensure_database(database_url):
        print(f"created database {urlparse(database_url).path.lstrip('/')}")
    RUN_DIR.mkdir(exist_ok=True)
    system = System(
        (database_url, setting("AMQP_URL")),
        os.environ.get("CARD_ENCRYPTION_KEY") or dotenv["CARD_ENCRYPTION_KEY"],
        database_url=database_url,
        private_vhost=False,
        bank_env={name: value for name, value in dotenv.items() if name != "CARD_ENCRYPTION_KEY"},
        gateway_env=dotenv,
        api_keys=setting("GATEWAY_API_KEYS"),
        api_port=API_PORT,
        bank_port=urlparse(setting("BANK_URL")).port,
        metrics_ports={
            "api": API_ADMIN_PORT,
            "worker": WORKER_METRICS_PORT,
            "relay": RELAY_METRICS_PORT,
            "webhooks": WEBHOOK_METRICS_PORT,
        },
        log_dir=RUN_DIR,
    )
    try:
        try:
            await system.start()
            await system.start("webhooks")
        except ProcessError as exc:
            raise SystemExit(f"{exc}\n(logs in {RUN_DIR}/)") from None
        print(f"system up: mockbank {system.bank_url}, API {system.api_url} (logs in .run/)")
        async with aiohttp.ClientSession() as session:
            await demo(session, system.api_url)
        print(
            f"\nThe gateway is running. Try it:\n"
            f"  curl -H 'Authorization: Bearer {DEV_KEY}' '{system.api_url}/v1/payments?customer_id=cus_demo'\n"
            f"  API docs: {system.api_url}/docs\n"
            f"  metrics, health and the ops console (GATEWAY_OPS_KEYS): {system.metrics_url('api')}/metrics, "
            f"/readyz, /ops/\nCtrl-C stops everything."
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping ...")
    finally:
        await system.close()


if __name__ == "__main__":
    asyncio.run(main())
