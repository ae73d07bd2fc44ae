"""The API against a real Postgres: app fixtures, a small client and worker stand-ins.

There is no worker in these tests: where a payment has to move on, the test
plays the worker with tests/support/phases.py's claim + record_outcome (or
lapses.expire_hold), the same phases the worker calls.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from gateway import config, logs
from gateway.api import admin, routes
from gateway.api.app import create_app
from gateway.domain import BankOutcome, Verdict
from gateway.payments import settlement
from tests.support import phases

API_KEY = "sk_test_ficmart_dev"
OTHER_KEY = "sk_test_other_merchant"
# Not one of the bank's test cards: a distinctive number that can be searched for everywhere.
CARD_NUMBER = "4000056655665556"
CVV = "9817"


@pytest.fixture(scope="session")
def api_settings(database_url, amqp_url, card_key) -> config.Settings:
    return config.parse(
        {
            "DATABASE_URL": database_url,
            "AMQP_URL": amqp_url,
            "GATEWAY_API_KEYS": f"ficmart:{API_KEY},other:{OTHER_KEY}",
            "CARD_ENCRYPTION_KEY": card_key,
            "LOG_LEVEL": "info",
            "GATEWAY_ENV": "development",
        },
        uses_card_key=True,
    )


@pytest.fixture(scope="session")
def api_logs() -> io.StringIO:
    """Everything the API logs during the session, as the JSON lines it would print."""
    buffer = io.StringIO()
    logs.setup("info", "gateway-api")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer), cache_logger_on_first_use=False)
    return buffer


@pytest.fixture(scope="session")
async def api_client(api_settings, pool, api_logs):
    async with TestClient(TestServer(create_app(api_settings, pool))) as c:
        yield c


@pytest.fixture(scope="session")
async def admin_client(api_client, api_settings):
    """The admin listener (gateway.api.admin) of api_client's app: /metrics, /healthz, /readyz, /ops."""
    async with TestClient(TestServer(admin.create_app(api_client.app, api_settings))) as c:
        yield c


def metrics_text(client: TestClient) -> str:
    """What the admin listener's /metrics would show for the app under `client`."""
    return generate_latest(client.server.app[routes.STATE].registry).decode()


@contextlib.asynccontextmanager
async def api_and_admin(settings: config.Settings, pool) -> AsyncIterator[tuple[TestClient, TestClient]]:
    """An API of its own on `pool` (the public app started first: it opens what both use)."""
    async with TestClient(TestServer(create_app(settings, pool))) as public:
        async with TestClient(TestServer(admin.create_app(public.app, settings))) as internal:
            yield public, internal


@pytest.fixture(scope="session")
async def api(api_client) -> Api:
    return Api(api_client)


def card(**overrides) -> dict:
    return {"number": CARD_NUMBER, "cvv": CVV, "expiry_month": 12, "expiry_year": 2030, **overrides}


def auth_body(**overrides) -> dict:
    body = {
        "order_id": f"ord_{uuid.uuid4().hex[:12]}",
        "customer_id": f"cus_{uuid.uuid4().hex[:12]}",
        "amount": 5000,
        "currency": "USD",
        "card": card(),
    }
    body.update(overrides)
    return body


class Api:
    """Thin helpers over the aiohttp test client; every call returns (response, parsed body)."""

    def __init__(self, client: TestClient, key: str = API_KEY):
        self.client = client
        self.key = key

    def headers(self, idempotency_key: str | None = None, **extra) -> dict:
        h = {"Authorization": f"Bearer {self.key}", **extra}
        if idempotency_key is not None:
            h["Idempotency-Key"] = idempotency_key
        return h

    async def post(self, path: str, body: dict | bytes | None = None, *, key: str | None = "auto", headers=None):
        if key == "auto":
            key = uuid.uuid4().hex
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        h = self.headers(key, **({"Content-Type": "application/json"} if data else {}))
        h.update(headers or {})
        resp = await self.client.post(path, data=data, headers=h)
        return resp, await _json(resp)

    async def get(self, path: str, *, params=None, headers=None):
        h = self.headers()
        h.update(headers or {})
        resp = await self.client.get(path, params=params, headers=h)
        return resp, await _json(resp)

    async def authorize(self, **overrides) -> dict:
        resp, body = await self.post("/v1/payments", auth_body(**overrides))
        assert resp.status == 202, body
        return body


async def _json(resp):
    raw = await resp.read()
    return orjson.loads(raw) if raw else None


# ---- the worker's part, played by the tests ------------------------------------------------


async def pending_operation(pool, payment_id: str) -> str:
    op = await pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", payment_id)
    assert op is not None, f"{payment_id} has no pending operation"
    return op


async def settle(pool, payment_id: str, verdict: Verdict = Verdict.SUCCEEDED, code: str = "insufficient_funds") -> dict:
    """Finish the payment's pending operation as the worker would, with a plausible bank answer."""
    op = await pending_operation(pool, payment_id)
    claimed = await phases.claim(pool, op, "test-worker", 30)
    assert isinstance(claimed, settlement.Claim), claimed
    if verdict is Verdict.SUCCEEDED:
        at = datetime.now(UTC)
        body = {
            "authorization_id": f"auth_{uuid.uuid4().hex}",
            "expires_at": (at + timedelta(days=7)).isoformat(),
            "capture_id": f"cap_{uuid.uuid4().hex}",
            "void_id": f"void_{uuid.uuid4().hex}",
            "refund_id": f"ref_{uuid.uuid4().hex}",
        }
        outcome = BankOutcome(kind="ok", http_status=200, body=body)
    else:
        outcome = BankOutcome(kind="error", http_status=400, code=code, message=code.replace("_", " "))
    payment = await phases.record_outcome(pool, claimed, verdict, outcome, bank_ms=3)
    assert payment is not None
    return payment


async def authorized(api: Api, pool, **overrides) -> dict:
    payment = await api.authorize(**overrides)
    return await settle(pool, payment["id"])


async def captured(api: Api, pool, **overrides) -> dict:
    payment = await authorized(api, pool, **overrides)
    resp, body = await api.post(f"/v1/payments/{payment['id']}/capture")
    assert resp.status == 202, body
    return await settle(pool, payment["id"])
