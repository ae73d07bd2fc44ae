"""The ops console (/ops on gateway-api's admin listener) against real PostgreSQL and RabbitMQ.

The module has its own database and vhost, like test_cli: the dead-letter
pages and "replay all" see everything parked. Parked operations are made the
way the worker makes them (settlement.park, then a message on payments.dead
with the consumer's headers); replays go through the console's forms, with
the form tokens read from the pages as a browser would.
"""

from __future__ import annotations

import base64
import html
import re
import uuid
from datetime import timedelta

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy

from gateway import config, db, messages, store, topology, webhooks
from gateway.api import routes
from gateway.api.ops import auth
from gateway.api.ops.throttle import FREE_FAILURES
from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.ops import decisions, rules
from gateway.timefmt import now
from gateway.webhook_rules import SecretBox
from harness import services
from harness.procs import free_port
from tests.integration.conftest import api_and_admin
from tests.support import factories
from tests.support.parked import ParkedWork

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]

API_KEY = "sk_test_ficmart_dev"
ALICE = "ops_key_alice_0123456789"
BOB = "ops_key_bob_9876543210xyz"
OPS_KEYS = f"alice:{ALICE},bob:{BOB}"
CARD = "4000056655665556"
# What a bank or a broker could send back: markup and a card number.
HOSTILE = f"<script>alert(1)</script> card {CARD}"
ERROR = {"code": "bank_connection", "message": HOSTILE, "retryable": True}


def basic(key: str, user: str | None = None) -> dict[str, str]:
    """Basic credentials: `key` under `user`, by default the name of the key's operator."""
    user = {ALICE: "alice", BOB: "bob"}.get(key, "alice") if user is None else user
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def settings_for(database_url: str, amqp_url: str, card_key: str, ops_keys: str | None = OPS_KEYS) -> config.Settings:
    env = {
        "DATABASE_URL": database_url,
        "AMQP_URL": amqp_url,
        "GATEWAY_API_KEYS": f"ficmart:{API_KEY}",
        "CARD_ENCRYPTION_KEY": card_key,
        "GATEWAY_ENV": "development",
    }
    if ops_keys is not None:
        env["GATEWAY_OPS_KEYS"] = ops_keys
    return config.parse(env, uses_card_key=True)


class Console(ParkedWork):
    """The console through aiohttp's test client, logged in as one operator."""

    def __init__(self, client: TestClient, pool, broker, vault: CardVault, key: str = ALICE):
        super().__init__(pool, broker, vault, ERROR)
        self.client, self.key = client, key
        self.public: TestClient | None = None
        self.database_url = ""

    @property
    def origin(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def get(self, path: str, *, key: str | None = None, **kw) -> tuple[int, str, CIMultiDictProxy[str]]:
        resp = await self.client.get(path, headers=basic(key or self.key), **kw)
        return resp.status, await resp.text(), resp.headers

    async def post(self, path: str, form: dict, *, headers: dict | None = None, key: str | None = None):
        h = {**basic(key or self.key), "Origin": self.origin, **(headers or {})}
        h = {k: v for k, v in h.items() if v is not None}
        resp = await self.client.post(path, data=form, headers=h, allow_redirects=False)
        return resp.status, await resp.text()

    async def token(self, page: str, action: str) -> str:
        """The token of the form posting to `action`, read from `page` as a browser would."""
        status, text, _ = await self.get(page)
        assert status == 200, text
        match = re.search(
            rf'action="{re.escape(action)}"[^>]*>\s*<input type="hidden" name="token" value="([^"]+)"', text
        )
        assert match, f"no form for {action} on {page}"
        return match.group(1)

    async def history(self, pid: str) -> list[tuple[str, str]]:
        rows = await store.ops_payment_history(self.pool, payment_id=pid)
        return [(r["status"], r["cause"]) for r in rows]


@pytest.fixture(scope="module")
async def console_env(server_urls, card_key):
    admin_url, amqp_root = server_urls
    async with services.private_database(admin_url) as database_url:
        with services.private_vhost(amqp_root) as amqp_url:
            pool = await db.create_pool(database_url, min_size=1, max_size=10)
            broker = await aio_pika.connect_robust(amqp_url)
            channel = await broker.channel()
            await topology.declare(channel, rules.parse_ladder(rules.DEFAULT_RETRY_LADDER))
            await channel.close()
            try:
                async with api_and_admin(settings_for(database_url, amqp_url, card_key), pool) as (public, internal):
                    console = Console(
                        internal, pool, broker, CardVault([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))])
                    )
                    console.public = public  # the API's public port, where /v1 is
                    # for the apps some tests start of their own: their long-poll watcher LISTENs
                    # there, and waits 5 s at start-up for a database it cannot reach
                    console.database_url = database_url
                    yield console
            finally:
                await broker.close()
                await pool.close()


@pytest.fixture
async def ops(console_env):
    # bank_circuit before operations: the order in which the API's backlog probe, running all
    # the while, reads them; the other order deadlocked with it once in five CI runs.
    await console_env.pool.execute(
        "TRUNCATE bank_circuit, payments, payment_history, operations, card_vault, outbox, idempotency_keys, "
        "reconciliation_findings, events, webhook_deliveries, webhook_endpoints"
    )
    for name in (topology.DEAD_QUEUE, topology.WORK_QUEUE):
        await console_env.drain(name)
    # a good login (a page that reads nothing): earlier tests' failed logins are forgotten
    assert (await console_env.get("/ops/console.css"))[0] == 200
    return console_env


# ---- who may open what ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("ops_key_wrong_0123456789"),
        basic(API_KEY),  # FicMart's key as the ops password
        {"Authorization": f"Bearer {API_KEY}"},
        {"Authorization": f"Bearer {ALICE}"},  # the ops key, but not as Basic
        {"Authorization": "Basic " + base64.b64encode(ALICE.encode()).decode()},  # no user:password
        {"Authorization": "Basic not-base64!"},
    ],
    ids=["none", "wrong key", "ficmart key", "ficmart bearer", "ops bearer", "no colon", "garbage"],
)
async def test_ops_needs_an_ops_key(ops, headers):
    for path in ("/ops/", "/ops/dead-letters", "/ops/console.css", f"/ops/payments/pay_{uuid.uuid4().hex}"):
        resp = await ops.client.get(path, headers=headers)
        text = await resp.text()
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith('Basic realm="gateway ops"')
        assert resp.content_type == "text/html" and "needs an ops key" in text
        assert resp.headers["X-Frame-Options"] == "DENY"


async def test_an_operator_logs_in_with_their_name_and_key(ops):
    for user, key in (("alice", ALICE), ("bob", BOB)):
        resp = await ops.client.get("/ops/", headers=basic(key, user))
        assert resp.status == 200
        assert f'<span class="who" title="signed in with this ops key">{user}</span>' in await resp.text()
    for user, key in (("someone", ALICE), ("", BOB), ("bob", ALICE)):
        resp = await ops.client.get("/ops/", headers=basic(key, user))
        assert resp.status == 401, user


def failures(client: TestClient, reason: str) -> float:
    registry = client.app[routes.STATE].registry
    return registry.get_sample_value("gateway_ops_login_failures_total", {"reason": reason}) or 0.0


async def login_from(client: TestClient, address: str, key: str, user: str | None = None) -> aiohttp.ClientResponse:
    """An /ops page from another loopback address (Linux routes all of 127.0.0.0/8 to lo): another source."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(client.make_url("/ops/console.css"), headers=basic(key, user)) as resp:
            await resp.read()
            return resp


async def test_failed_logins_are_counted_and_locked_out_per_source_and_per_name(console_env, card_key):
    # An app of its own: the names it locks out stay out of the other tests' way.
    settings = settings_for(console_env.database_url, "amqp://guest:guest@127.0.0.1:1/", card_key)
    async with api_and_admin(settings, console_env.pool) as (_, client):
        wrong = "ops_key_wrong_0123456789"
        for _ in range(FREE_FAILURES):
            assert (await login_from(client, "127.0.0.2", wrong)).status == 401
        resp = await login_from(client, "127.0.0.2", wrong)  # one failure too many: 127.0.0.2 and alice locked out
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        assert failures(client, "bad_credentials") == FREE_FAILURES + 1
        # the name is locked out from any source: a further guess is refused, or locks it out again
        resp = await login_from(client, "127.0.0.3", wrong, "alice")
        assert resp.status == 429 and "Retry-After" in resp.headers
        # another operator from another source is not held up
        assert (await login_from(client, "127.0.0.4", BOB)).status == 200
        assert failures(client, "bad_credentials") + failures(client, "locked_out") == FREE_FAILURES + 2
        assert "ops_key_wrong" not in repr(list(client.app[routes.STATE].registry.collect()))


async def test_an_ops_key_never_opens_v1(ops):
    assert ops.public is not None
    for client in (ops.public, ops.client):
        for headers in ({"Authorization": f"Bearer {ALICE}"}, basic(ALICE)):
            for method, path in (("GET", "/v1/payments?order_id=x"), ("POST", "/v1/payments")):
                resp = await client.request(method, path, headers={**headers, "Idempotency-Key": "k"})
                assert resp.status == 401, (headers, path)
                assert (await resp.json())["error"]["code"] == "unauthorized"
    resp = await ops.public.get("/v1/payments?order_id=x", headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status == 200  # the FicMart key still works there


async def test_the_console_is_not_on_the_public_port(ops):
    assert ops.public is not None
    for path in ("/ops", "/ops/", "/ops/dead-letters"):
        resp = await ops.public.get(path, headers=basic(ALICE))
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_without_ops_keys_the_console_says_it_is_not_configured(console_env, card_key):
    settings = settings_for(console_env.database_url, "amqp://guest:guest@127.0.0.1:1/", card_key, None)
    assert settings.ops_keys == {}
    async with api_and_admin(settings, console_env.pool) as (_, client):
        for path, headers in (("/ops/", {}), ("/ops/dead-letters", basic(ALICE)), ("/ops/x", basic(API_KEY))):
            resp = await client.get(path, headers=headers)
            assert resp.status == 404
            text = await resp.text()
            assert "not configured" in text and "GATEWAY_OPS_KEYS" in text


# ---- pages ------------------------------------------------------------------------------------


async def test_every_page_has_the_security_headers_and_no_outside_asset(ops):
    pid, op = await ops.parked()
    for path in (
        "/ops/",
        "/ops/flagged",
        "/ops/dead-letters",
        f"/ops/dead-letters/{op}",
        f"/ops/dead-letters/{op}/force",
        "/ops/findings",
        "/ops/webhooks",
        "/ops/payments",
        f"/ops/payments/{pid}",
        "/ops/nothing-here",
    ):
        status, text, headers = await ops.get(path)
        assert status == (404 if path == "/ops/nothing-here" else 200), (path, text)
        assert headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Request-Id"]
        assert headers["Content-Type"].startswith("text/html")
        assert not re.search(r'(src|href)="(https?:)?//', text), path  # nothing from elsewhere
        assert "<script" not in text, path
    status, css, headers = await ops.get("/ops/console.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css") and "--accent" in css


async def test_overview(ops):
    await ops.parked()
    paid = await factories.authorize(ops.pool, ops.vault, 900)
    await ops.settle(await ops.pending_op(paid), {"authorization_id": "auth_x", "expires_at": "2030-01-01T00:00:00Z"})
    await store.record_circuit_state(ops.pool, worker_id="worker-a", open=True, changed_at=now(), detail=HOSTILE)
    await store.record_circuit_state(ops.pool, worker_id="worker-b", open=False, changed_at=now(), detail=None)
    gone = now() - timedelta(minutes=30)
    await store.record_circuit_state(ops.pool, worker_id="worker-gone", open=True, changed_at=gone, detail=None)
    status, text, _ = await ops.get("/ops/")
    assert status == 200
    page = html.unescape(re.sub(r"<[^>]+>", " ", text))
    words = " ".join(page.split())
    assert "Payments 2" in words
    assert "Flagged (attention_required) 1" in words
    assert "Parked operations 1 1 message(s) in payments.dead" in words
    assert re.search(r"Outbox backlog \d+ oldest unsent", words)  # nothing relays in this test
    assert "Bank circuit breaker open 1 of 3 worker(s) open" in words
    assert "capturing 1 1" in words and "authorized 1 0" in words
    assert "worker-a open" in words and "worker-b closed" in words and "worker-gone stale (open)" in words
    assert CARD not in text and "<script>alert" not in text and "&lt;script&gt;" in text


async def test_circuit_state_is_one_row_per_worker(ops):
    first, later = now() - timedelta(seconds=30), now()
    await store.record_circuit_state(ops.pool, worker_id="w1", open=True, changed_at=first, detail="bank down")
    await store.record_circuit_state(ops.pool, worker_id="w1", open=False, changed_at=later, detail=None)
    await store.record_circuit_state(ops.pool, worker_id="w0", open=False, changed_at=first, detail=None)
    rows = [dict(r) for r in await store.circuit_states(ops.pool)]
    assert rows == [
        {"worker_id": "w0", "open": False, "changed_at": first, "detail": None},
        {"worker_id": "w1", "open": False, "changed_at": later, "detail": None},
    ]


async def test_flagged_payments(ops):
    pid, op = await ops.parked()
    flagged_by_reconciliation = await factories.authorize(ops.pool, ops.vault, 700)
    hold = {"authorization_id": "auth_a", "expires_at": "2030-01-01T00:00:00Z"}
    await ops.settle(await ops.pending_op(flagged_by_reconciliation), hold)
    await ops.pool.execute("UPDATE payments SET attention_required = true WHERE id = $1", flagged_by_reconciliation)
    status, text, _ = await ops.get("/ops/flagged")
    assert status == 200
    assert f'href="/ops/payments/{pid}"' in text and f'href="/ops/dead-letters/{op}">capture (parked)' in text
    assert f'href="/ops/payments/{flagged_by_reconciliation}"' in text and "see <a" in text
    assert CARD not in text and "<script>alert" not in text


async def test_dead_letters_list_and_show(ops):
    pid, op = await ops.parked()
    await ops.dead_letter(f"op_{uuid.uuid4().hex}", "pay_unknown", "capture", body=f'{{"card": "{CARD}"}}'.encode())
    await ops.dead_letter("", "pay_x", "capture", body=b"<b>not json</b>")  # names no operation
    status, text, _ = await ops.get("/ops/dead-letters")
    assert status == 200
    assert f'href="/ops/dead-letters/{op}"' in text and f'action="/ops/dead-letters/{op}/replay"' in text
    assert "unknown operation" in text and "unreadable" in text
    assert "Replay all (not forced)" in text
    status, text, _ = await ops.get(f"/ops/dead-letters/{op}")
    assert status == 200
    assert "a replay unparks it and sends its command to the work queue" in text
    assert f'href="/ops/payments/{pid}"' in text and "Messages in payments.dead" in text
    assert CARD not in text and "<script>alert" not in text
    # the queue is as it was: both pages gave every letter back
    status, text, _ = await ops.get(f"/ops/dead-letters/{op}")
    assert 'Messages in payments.dead <span class="count">1</span>' in text
    status, text, _ = await ops.get(f"/ops/dead-letters/op_{uuid.uuid4().hex}")
    assert status == 404 and "Unknown operation" in text


async def test_findings(ops):
    pid = await factories.authorize(ops.pool, ops.vault, 800)
    async with ops.pool.acquire() as conn:
        await store.insert_finding(
            conn,
            run_id="rec_1",
            payment_id=pid,
            kind="amount_mismatch",
            detail={"object": "authorization", "ours": 800, "bank": 900, "note": HOSTILE},
            repaired=False,
            found_at=now(),
        )
        await store.insert_finding(
            conn,
            run_id="worker:op_1",
            payment_id=pid,
            kind="possible_duplicate_hold",
            detail={"lost_attempts": [{"attempt": 1, "code": "bank_timeout"}], "check_at_bank": f"holds {HOSTILE}"},
            repaired=False,
            found_at=now(),
        )
    status, text, _ = await ops.get("/ops/findings")
    assert status == 200
    assert "amount_mismatch" in text and "rec_1" in text and f'href="/ops/payments/{pid}"' in text
    assert "Check at the bank: holds" in text and "&#34;bank_timeout&#34;" in text  # the whole detail, readable
    assert CARD not in text and "<script>alert" not in text


async def test_search_by_payment_order_or_customer(ops):
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    first = await factories.authorize(ops.pool, ops.vault, 100)
    second = await factories.authorize(ops.pool, ops.vault, 200)
    await ops.pool.execute("UPDATE payments SET customer_id = $1 WHERE id = ANY($2::text[])", customer, [first, second])
    order = await ops.pool.fetchval("SELECT order_id FROM payments WHERE id = $1", first)
    for term in (first, order):  # one match: straight to its timeline
        resp = await ops.client.get(
            "/ops/payments", params={"q": f" {term} "}, headers=basic(ALICE), allow_redirects=False
        )
        assert resp.status == 303 and resp.headers["Location"] == f"/ops/payments/{first}"
    status, text, _ = await ops.get("/ops/payments", params={"q": customer})
    assert status == 200 and "2 payment(s)" in text
    assert f'href="/ops/payments/{first}"' in text and f'href="/ops/payments/{second}"' in text
    status, text, _ = await ops.get("/ops/payments", params={"q": "<i>nothing</i>"})
    assert status == 200 and "no payment found" in text and "<i>nothing" not in text


async def test_payment_timeline(ops):
    pid, op = await ops.parked()
    authorize_op = await ops.pool.fetchval(
        "SELECT id FROM operations WHERE payment_id = $1 AND kind = 'authorize'", pid
    )
    await ops.pool.execute(
        "UPDATE operations SET bank_response = $2 WHERE id = $1",
        authorize_op,
        {"authorization_id": "auth_1", "echo": HOSTILE},
    )
    status, text, _ = await ops.get(f"/ops/payments/{pid}")
    assert status == 200
    for expected in (
        "api:authorize",
        "bank:authorize:succeeded",
        "api:capture",
        authorize_op,
        op,
        "capturing",
        "payment.authorized",  # the event from the outbox
        "payments.commands",  # the commands of its operations
        "Bank answer",
    ):
        assert expected in text, expected
    assert CARD not in text and "<script>alert" not in text
    status, text, _ = await ops.get(f"/ops/payments/pay_{uuid.uuid4().hex}")
    assert status == 404 and "Unknown payment" in text


# ---- actions: cross-site protection -----------------------------------------------------------


async def test_a_replay_needs_a_valid_token_and_the_same_origin(ops):
    pid, op = await ops.parked()
    action = f"/ops/dead-letters/{op}/replay"
    token = await ops.token("/ops/dead-letters", action)
    _other_pid, other_op = await ops.parked()
    operator = auth.Operator("alice", ALICE)
    refused = [
        ({}, {}, "missing or malformed"),
        ({"token": "nonsense"}, {}, "missing or malformed"),
        ({"token": token[:-2] + "00"}, {}, "not valid"),
        ({"token": await ops.token("/ops/dead-letters", f"/ops/dead-letters/{other_op}/replay")}, {}, "not valid"),
        ({"token": auth.form_token(operator, "replay", op, at=now().timestamp() - 3600)}, {}, "expired"),
        ({"token": auth.form_token(auth.Operator("alice", BOB), "replay", op)}, {}, "not valid"),  # bob's key
        ({"token": token}, {"Origin": "https://evil.example"}, "another origin"),
        ({"token": token}, {"Origin": "null"}, "another origin"),
        ({"token": token}, {"Origin": None, "Referer": "https://evil.example/ops/"}, "another origin"),
        ({"token": token}, {"Origin": None}, "neither an Origin nor a Referer"),
    ]
    for form, headers, reason in refused:
        status, text = await ops.post(action, form, headers=headers)
        assert status == 403, (form, headers)
        assert "Refused" in text and reason in text, (reason, text)
        assert (await ops.operation(op))["parked"], "a refused POST changes nothing"
    status, text = await ops.post(action, {"token": token}, key=BOB)
    assert status == 403 and "not valid" in text  # alice's token is not bob's
    status, text = await ops.post(action, {"token": token}, headers={"Origin": None, "Referer": f"{ops.origin}/ops/"})
    assert status == 200 and "replayed" in text  # a same-origin Referer is enough
    assert not (await ops.operation(op))["parked"]
    assert ("capturing", "ops:alice:replay") in await ops.history(pid)


async def test_get_changes_nothing(ops):
    _pid, op = await ops.parked()
    for path in (f"/ops/dead-letters/{op}/replay", f"/ops/dead-letters/{op}/force", "/ops/dead-letters/replay-all"):
        await ops.get(path)
    assert (await ops.operation(op))["parked"]
    assert len(await ops.drain(topology.WORK_QUEUE)) == 0


# ---- actions: replays -------------------------------------------------------------------------


async def test_replay_through_the_console(ops):
    pid, op = await ops.parked()
    token = await ops.token(f"/ops/dead-letters/{op}", f"/ops/dead-letters/{op}/replay")
    status, text = await ops.post(f"/ops/dead-letters/{op}/replay", {"token": token})
    assert status == 200, text
    assert "replayed" in text and "1 dead letter(s) removed" in text
    row = await ops.operation(op)
    assert row["status"] == "pending" and not row["parked"]
    payment = await ops.pool.fetchrow("SELECT status, attention_required FROM payments WHERE id = $1", pid)
    assert (payment["status"], payment["attention_required"]) == ("capturing", False)
    assert (await ops.history(pid))[-1] == ("capturing", "ops:alice:replay")
    (command,) = await ops.drain(topology.WORK_QUEUE)
    assert orjson.loads(command.body) == {"operation_id": op}
    assert command.routing_key == "capture" and not (await ops.operation(op))["forced_replay"]
    assert await ops.drain(topology.DEAD_QUEUE) == []
    # again: already back in the flow, no new history entry for nothing done
    token = await ops.token(f"/ops/dead-letters/{op}", f"/ops/dead-letters/{op}/replay")
    status, text = await ops.post(f"/ops/dead-letters/{op}/replay", {"token": token}, key=ALICE)
    assert status == 200 and "was not parked" in text


async def test_the_key_horizon_needs_an_explicit_confirmation(ops):
    pid, op = await ops.parked("authorize", first_attempt_hours_ago=30)
    status, text, _ = await ops.get("/ops/dead-letters")
    assert f'href="/ops/dead-letters/{op}/force"' in text and f'action="/ops/dead-letters/{op}/replay"' not in text
    # a plain replay (a token from the show page's form) is refused, as without --force
    token = auth.form_token(auth.Operator("bob", BOB), "replay", op)
    status, text = await ops.post(f"/ops/dead-letters/{op}/replay", {"token": token}, key=BOB)
    assert status == 200 and "refused" in text and "second hold" in text and f"/ops/dead-letters/{op}/force" in text
    assert (await ops.operation(op))["parked"]
    # the confirmation page; its form without the box ticked does nothing
    force = f"/ops/dead-letters/{op}/force"
    token = await ops.token(force, force)
    status, text = await ops.post(force, {"token": token})
    assert status == 400 and "Not confirmed" in text
    assert (await ops.operation(op))["parked"]
    # a plain replay token does not open the forced replay
    plain = auth.form_token(auth.Operator("alice", ALICE), "replay", op)
    status, text = await ops.post(force, {"token": plain, "confirm": "checked-the-bank"})
    assert status == 403
    status, text = await ops.post(force, {"token": token, "confirm": "checked-the-bank"})
    assert status == 200 and "replayed (forced)" in text
    assert not (await ops.operation(op))["parked"]
    assert (await ops.history(pid))[-1] == ("pending", "ops:alice:replay:force")
    (command,) = await ops.drain(topology.WORK_QUEUE)
    assert (await ops.operation(op))["forced_replay"] and command.routing_key == "authorize"


async def test_replay_all_from_the_console(ops):
    first_pid, first = await ops.parked()
    second_pid, second = await ops.parked("authorize")
    old_pid, old = await ops.parked("authorize", first_attempt_hours_ago=30)
    token = await ops.token("/ops/dead-letters", "/ops/dead-letters/replay-all")
    status, text = await ops.post("/ops/dead-letters/replay-all", {"token": token})
    assert status == 200, text
    assert text.count(">replayed<") == 2 and ">refused<" in text
    assert not (await ops.operation(first))["parked"] and not (await ops.operation(second))["parked"]
    assert (await ops.operation(old))["parked"]
    assert (await ops.history(first_pid))[-1][1] == "ops:alice:replay"
    assert (await ops.history(second_pid))[-1][1] == "ops:alice:replay"
    assert "ops:" not in " ".join(cause for _, cause in await ops.history(old_pid))
    assert len(await ops.drain(topology.WORK_QUEUE)) == 2


# ---- actions: a bank reference found at the bank ------------------------------------------------


async def test_record_a_capture_id_the_bank_never_gave_us(ops):
    pid, op = await ops.parked()
    status, text, _ = await ops.get(f"/ops/payments/{pid}")
    assert "Record a bank reference" not in text  # the capture is in flight: nothing to record yet
    await decisions.settle_by_hand(ops.pool, op, succeeded=True, reason="bank shows it", by="bob")
    action = f"/ops/payments/{pid}/reference"
    token = await ops.token(f"/ops/payments/{pid}", action)
    status, text, _ = await ops.get(f"/ops/payments/{pid}")
    assert '<option value="capture_id">' in text and '<option value="authorization_id">' not in text

    cap = f"cap_{uuid.uuid4()}"
    form = {"token": token, "name": "capture_id", "value": cap, "reason": "bank back office"}
    for refused, headers, why in (
        ({**form, "token": "nonsense"}, {}, "missing or malformed"),
        (form, {"Origin": "https://evil.example"}, "another origin"),
    ):
        status, text = await ops.post(action, refused, headers=headers)
        assert status == 403 and why in text
    status, text = await ops.post(action, {**form, "value": "cap_123"})
    assert status == 400 and "Nothing was recorded" in text and "lowercase UUID" in text
    status, text = await ops.post(action, {**form, "reason": " "})
    assert status == 400 and "a reason is required" in text
    assert (await ops.pool.fetchval("SELECT capture_id FROM payments WHERE id = $1", pid)) is None

    status, text = await ops.post(action, form)
    assert status == 303, text
    row = await ops.pool.fetchrow("SELECT capture_id, attention_required, status FROM payments WHERE id = $1", pid)
    assert (row["capture_id"], row["attention_required"], row["status"]) == (cap, True, "captured")
    assert (await ops.history(pid))[-1] == ("captured", f"ops:alice:set-reference:capture_id={cap} bank back office")
    status, text, _ = await ops.get(f"/ops/payments/{pid}")
    assert cap in text and "Record a bank reference" not in text  # nothing left to record
    status, text = await ops.post(action, {**form, "value": f"cap_{uuid.uuid4()}"})
    assert status == 409 and f"already has capture_id {cap}" in text


async def test_broker_down_the_dead_letter_pages_say_so(console_env, card_key):
    ops = console_env
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings = settings_for(ops.database_url, dead_broker, card_key)
    async with api_and_admin(settings, ops.pool) as (_, client):
        resp = await client.get("/ops/", headers=basic(ALICE))
        text = await resp.text()
        assert resp.status == 200 and "payments.dead: unavailable" in text and "could not be asked" in text
        resp = await client.get("/ops/dead-letters", headers=basic(ALICE))
        assert resp.status == 503 and "RabbitMQ is unavailable" in await resp.text()


async def test_ops_without_the_slash_is_the_overview(ops):
    resp = await ops.client.get("/ops", allow_redirects=False)
    assert resp.status == 308 and resp.headers["Location"] == "/ops/"
    status, text, _ = await ops.get("/ops")  # followed
    assert status == 200 and "<h1>Overview</h1>" in text


# ---- webhooks ---------------------------------------------------------------------------------


async def test_webhook_endpoints_and_failed_deliveries_disable_and_resend(ops, card_key):
    box = SecretBox([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))])
    await webhooks.register(ops.pool, box, "ficmart", "http://127.0.0.1:9/<hooks>", development=True)
    for n in range(2):
        event = messages.event("payment.captured", {"id": f"pay_{n}"}, now(), merchant="ficmart")
        await ops.pool.execute(
            "INSERT INTO outbox (exchange, routing_key, message_id, body, headers) VALUES ($1, $2, $3, $4, $5)",
            event.exchange,
            event.routing_key,
            event.message_id,
            event.body,
            event.headers,
        )
    await ops.pool.execute(
        "UPDATE webhook_deliveries SET status = 'failed', attempts = 40, last_error = $1, finished_at = now()",
        HOSTILE,
    )
    failed = [f["event_id"] for f in await webhooks.failed(ops.pool)]
    status, text, _ = await ops.get("/ops/webhooks")
    assert status == 200 and "http://127.0.0.1:9/&lt;hooks&gt;" in text and "<script>" not in text
    assert all(event_id in text for event_id in failed) and CARD not in text

    # A resend needs its token, as every console action does.
    action = f"/ops/webhooks/events/{failed[0]}/resend"
    assert (await ops.post(action, {"token": "forged"}))[0] == 403
    token = await ops.token("/ops/webhooks", action)
    status, _ = await ops.post(action, {"token": token})
    assert status == 303
    assert [f["event_id"] for f in await webhooks.failed(ops.pool)] == failed[1:]

    token = await ops.token("/ops/webhooks", "/ops/webhooks/resend-failed")
    assert (await ops.post("/ops/webhooks/resend-failed", {"token": token}))[0] == 303
    assert await webhooks.failed(ops.pool) == []

    token = await ops.token("/ops/webhooks", "/ops/webhooks/ficmart/disable")
    assert (await ops.post("/ops/webhooks/ficmart/disable", {"token": token}))[0] == 303
    (endpoint,) = await webhooks.endpoints(ops.pool)
    assert not endpoint["enabled"] and endpoint["pending"] == 2
