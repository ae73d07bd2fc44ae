"""Cross-cutting behaviour: auth, request ids, error format, health, metrics, OpenAPI, logs."""

from __future__ import annotations

import re
import uuid

import asyncpg
import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from gateway import db, views
from gateway.domain import Verdict
from tests.integration.conftest import API_KEY, api_and_admin, auth_body, captured, settle

pytestmark = pytest.mark.asyncio(loop_scope="session")


# ---- auth ----


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic c2tfdGVzdA==",
        f"Token {API_KEY}",
        "Bearer sk_test_wrong_key",
        f"Bearer {API_KEY}x",
    ],
    ids=["none", "empty", "no token", "blank token", "basic", "token scheme", "wrong key", "longer key"],
)
async def test_v1_needs_a_valid_bearer_key(api_client, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in [
        ("GET", "/v1/payments?order_id=x"),
        ("GET", f"/v1/payments/pay_{uuid.uuid4().hex}"),
        ("POST", "/v1/payments"),
        ("POST", f"/v1/payments/pay_{uuid.uuid4().hex}/capture"),
        ("GET", "/v1/nothing-here"),
    ]:
        resp = await api_client.request(method, path, headers={**headers, "Idempotency-Key": "k"})
        body = await resp.json()
        assert resp.status == 401, (method, path)
        assert body["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.headers["X-Request-Id"]


async def test_bearer_scheme_is_case_insensitive(api_client):
    resp = await api_client.get("/v1/payments?order_id=x", headers={"Authorization": f"bearer {API_KEY}"})
    assert resp.status == 200


async def test_operational_endpoints_need_no_key(api_client, admin_client):
    for client, path in (
        (api_client, "/openapi.json"),
        (api_client, "/docs"),
        (admin_client, "/healthz"),
        (admin_client, "/readyz"),
        (admin_client, "/metrics"),
    ):
        resp = await client.get(path)
        assert resp.status == 200, path


async def test_the_public_port_serves_v1_docs_and_openapi_only(api_client):
    # Probes, metrics and the ops console are on the admin listener (gateway.api.admin): from the
    # public port nobody reaches the database unauthenticated, reads the metrics or tries ops keys.
    for path in ("/healthz", "/readyz", "/metrics", "/ops", "/ops/", "/ops/dead-letters", "/ops/console.css"):
        resp = await api_client.get(path)
        assert resp.status == 404, path
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_the_admin_listener_serves_no_v1(admin_client):
    for method, path, status in (
        ("GET", "/v1/payments?order_id=x", 401),  # no API key opens /v1 there
        ("POST", "/v1/payments", 401),
        ("GET", "/openapi.json", 404),
        ("GET", "/docs", 404),
    ):
        resp = await admin_client.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"})
        assert resp.status == status, path


# ---- request ids and the error format ----


async def test_request_id_is_echoed(api):
    resp, _ = await api.get("/v1/payments", params={"order_id": "x"}, headers={"X-Request-Id": "abc-123.DEF:7_x"})
    assert resp.headers["X-Request-Id"] == "abc-123.DEF:7_x"


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "semi;colon", "é"])
async def test_insane_request_ids_are_replaced(api, given):
    resp, _ = await api.get("/v1/payments", params={"order_id": "x"}, headers={"X-Request-Id": given})
    assert resp.headers["X-Request-Id"].startswith("req_") and resp.headers["X-Request-Id"] != given


async def test_request_id_is_generated_and_unique(api_client):
    ids = set()
    for _ in range(5):
        resp = await api_client.get("/openapi.json")
        ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 5


@pytest.mark.parametrize(
    "method,path,status,code",
    [
        ("GET", "/nothing", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("DELETE", "/openapi.json", 405, "method_not_allowed"),
        ("PUT", "/v1/payments", 405, "method_not_allowed"),
        ("GET", "/v1/payments/pay_x/capture", 405, "method_not_allowed"),
        ("POST", "/v1/payments/pay_x/explode", 404, "not_found"),
    ],
)
async def test_framework_errors_are_json(api, method, path, status, code):
    resp = await api.client.request(
        method, path, headers={**api.headers(), "Accept": "text/html", "Idempotency-Key": "k"}
    )
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert resp.headers["X-Request-Id"]


async def test_unexpected_exception_is_a_json_500_logged_with_traceback(api, monkeypatch, api_logs):
    async def boom(*_args, **_kwargs):
        raise RuntimeError("something secret broke")

    monkeypatch.setattr(views, "get_payment", boom)
    resp, body = await api.get(
        f"/v1/payments/pay_{uuid.uuid4().hex}", headers={"Accept": "text/html", "X-Request-Id": "req-boom-1"}
    )
    assert resp.status == 500 and resp.content_type == "application/json"
    assert body == {"error": {"code": "internal_error", "message": "the gateway failed to handle the request"}}
    lines = [orjson.loads(line) for line in api_logs.getvalue().splitlines() if "req-boom-1" in line]
    error = next(line for line in lines if line["event"] == "unhandled error")
    assert "Traceback" in error["exception"] and "something secret broke" in error["exception"]
    access = next(line for line in lines if line["event"] == "request")
    assert access["status"] == 500


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("connection refused"),
        # what a pooled connection raises when its primary died under it (the failover drills)
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        # a switchover's old primary, read-only until it is stopped (the drills' sweeper met it)
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    ],
    ids=["refused", "connection-broken-mid-error", "primary-turned-read-only"],
)
async def test_database_unreachable_is_503(api, monkeypatch, error):
    async def refused(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(views, "get_payment", refused)
    resp, body = await api.get(f"/v1/payments/pay_{uuid.uuid4().hex}")
    assert resp.status == 503 and body["error"]["code"] == "service_unavailable"
    assert resp.headers["Retry-After"] == "1"


# ---- access log ----


async def test_one_access_line_per_request_with_context(api, api_logs):
    rid = f"req-log-{uuid.uuid4().hex[:8]}"
    resp, payment = await api.post("/v1/payments", None, headers={"X-Request-Id": rid})  # 400: bad JSON
    resp, payment = await api.post(
        "/v1/payments",
        orjson.dumps(
            {
                "order_id": "o-log-" + rid,
                "customer_id": "c",
                "amount": 1,
                "currency": "USD",
                "card": {"number": "4242424242424242", "cvv": "456", "expiry_month": 6, "expiry_year": 2030},
            }
        ),
        headers={"X-Request-Id": rid + "b"},
    )
    assert resp.status == 202
    lines = [orjson.loads(line) for line in api_logs.getvalue().splitlines()]
    first = [line for line in lines if line.get("request_id") == rid]
    second = [line for line in lines if line.get("request_id") == rid + "b"]
    assert len(first) == 1 and len(second) == 1
    line = second[0]
    assert line["event"] == "request" and line["method"] == "POST" and line["route"] == "/v1/payments"
    assert line["status"] == 202 and isinstance(line["duration_ms"], float)
    assert line["payment_id"] == payment["id"] and line["merchant"] == "ficmart"
    assert first[0]["status"] == 400 and "payment_id" not in first[0]
    # context does not leak into the next request on the same connection
    resp, _ = await api.get("/v1/payments", params={"order_id": "x"}, headers={"X-Request-Id": rid + "c"})
    third = [orjson.loads(x) for x in api_logs.getvalue().splitlines() if rid + "c" in x]
    assert len(third) == 1 and "payment_id" not in third[0]


async def test_access_line_names_the_route_template(api, pool, api_logs):
    payment = await api.authorize()
    rid = f"req-tpl-{uuid.uuid4().hex[:8]}"
    await api.get(f"/v1/payments/{payment['id']}", headers={"X-Request-Id": rid})
    line = next(orjson.loads(x) for x in api_logs.getvalue().splitlines() if rid in x)
    assert line["route"] == "/v1/payments/{payment_id}" and line["payment_id"] == payment["id"]


async def test_a_callers_trace_is_linked_not_adopted_and_its_tracestate_goes_nowhere(api, pool, api_logs):
    """docs/api.md: the gateway starts its own trace, linked to the caller's, and names it
    in `traceresponse`. The caller's ids never name ours (they would land in our logs) and its
    `tracestate` is not carried on (the worker would send it to the bank)."""
    caller = uuid.uuid4().hex
    headers = {"traceparent": f"00-{caller}-{uuid.uuid4().hex[:16]}-01", "tracestate": "merchant=chosen"}
    rid = f"req-trace-{uuid.uuid4().hex[:8]}"
    resp, payment = await api.post("/v1/payments", auth_body(), headers={**headers, "X-Request-Id": rid})
    assert resp.status == 202, payment
    version, ours, span_id, _flags = resp.headers["traceresponse"].split("-")
    assert version == "00" and len(ours) == 32 and ours != caller and int(span_id, 16)
    (command,) = await pool.fetch(
        "SELECT o.headers FROM outbox o JOIN operations op"
        " ON convert_from(o.body, 'UTF8')::jsonb->>'operation_id' = op.id WHERE op.payment_id = $1",
        payment["id"],
    )
    assert set(command["headers"]) == {"traceparent"} and command["headers"]["traceparent"].split("-")[1] == ours
    (access,) = [orjson.loads(x) for x in api_logs.getvalue().splitlines() if rid in x]
    assert access["trace_id"] == ours and caller not in api_logs.getvalue()


# ---- health, readiness, metrics ----


async def test_healthz(admin_client):
    resp = await admin_client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_readyz_ok(admin_client):
    resp = await admin_client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


async def test_readyz_names_the_broken_broker(api_settings, pool):
    broken = api_settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:1/"})
    async with api_and_admin(broken, pool) as (_, client):
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {"status": "unavailable", "checks": {"database": "ok", "broker": "failed"}}


async def test_readyz_names_the_broken_database(api_settings, database_url):
    own = await db.create_pool(database_url, min_size=1, max_size=2)
    async with api_and_admin(api_settings, own) as (_, client):
        await own.close()
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"] == {"database": "failed", "broker": "ok"}


async def test_metrics_count_by_route_template_and_status(api, admin_client):
    payment = await api.authorize()
    await api.get(f"/v1/payments/{payment['id']}")
    await api.get(f"/v1/payments/pay_{uuid.uuid4().hex}")
    resp = await admin_client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'gateway_http_requests_total{method="POST",route="/v1/payments",status="202"}' in text
    assert 'gateway_http_requests_total{method="GET",route="/v1/payments/{payment_id}",status="200"}' in text
    assert 'gateway_http_requests_total{method="GET",route="/v1/payments/{payment_id}",status="404"}' in text
    assert (
        'gateway_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/payments",status="202"}'
        in text
    )
    assert "gateway_longpoll_waiters" in text
    assert payment["id"] not in text


# ---- OpenAPI and docs ----


async def test_openapi_document_is_valid_and_complete(api_client):
    resp = await api_client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/v1/payments",
        "/v1/payments/{payment_id}",
        "/v1/payments/{payment_id}/capture",
        "/v1/payments/{payment_id}/void",
        "/v1/payments/{payment_id}/refund",
        "/v1/events",
        "/openapi.json",
        "/docs",
    }
    comps = doc["components"]
    assert comps["securitySchemes"]["bearerAuth"] == {
        **comps["securitySchemes"]["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
    }
    assert comps["parameters"]["IdempotencyKey"]["in"] == "header" and comps["parameters"]["IdempotencyKey"]["required"]
    assert {"Payment", "PaymentList", "ErrorResponse", "AuthorizeIn", "ActionIn", "CardIn"} <= set(comps["schemas"])
    authorize = doc["paths"]["/v1/payments"]["post"]
    assert set(authorize["responses"]) == {"202", "400", "401", "409", "413", "415", "422", "429", "500", "503"}
    assert authorize["security"] == [{"bearerAuth": []}]
    assert {"$ref": "#/components/parameters/IdempotencyKey"} in authorize["parameters"]
    for action in ("capture", "void", "refund"):
        op = doc["paths"][f"/v1/payments/{{payment_id}}/{action}"]["post"]
        assert {"202", "404", "409", "422"} <= set(op["responses"])
    assert comps["schemas"]["AuthorizeIn"]["additionalProperties"] is False
    assert comps["schemas"]["CardIn"]["additionalProperties"] is False
    assert set(comps["schemas"]["Payment"]["required"]) == set(comps["schemas"]["Payment"]["properties"])


async def test_real_payments_match_the_documented_schema(api, api_client, pool):
    doc = await (await api_client.get("/openapi.json")).json()
    defs = orjson.loads(orjson.dumps(doc["components"]["schemas"]).replace(b"#/components/schemas/", b"#/$defs/"))

    def validator(name):
        return Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{name}"})

    pending = await api.authorize()
    declined = await settle(pool, (await api.authorize())["id"], Verdict.REFUSED, "insufficient_funds")
    done = await captured(api, pool)
    for payment in (pending, declined, done):
        validator("Payment").validate(payment)
    _resp, page = await api.get("/v1/payments", params={"customer_id": done["customer_id"]})
    validator("PaymentList").validate(page)
    _resp, err = await api.post(f"/v1/payments/{done['id']}/void")
    validator("ErrorResponse").validate(err)


async def test_docs_page_serves_swagger_ui_without_remote_assets(api_client):
    resp = await api_client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("/docs/") for s in sources), sources
    for source in sources:
        asset = await api_client.get(source)
        assert asset.status == 200, source
        assert asset.content_type in ("text/css", "text/javascript", "application/javascript"), source
        assert len(await asset.read()) > 10, source
    init = await (await api_client.get("/docs/init.js")).text()
    assert '"/openapi.json"' in init


async def test_docs_serves_only_the_files_its_page_loads_under_a_content_security_policy(api_client):
    page = await (await api_client.get("/docs")).text()
    loaded = ["/docs", *re.findall(r'(?:src|href)="([^"]+)"', page)]
    assert sorted(loaded) == [
        "/docs",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/docs/init.js",
    ]
    for path in loaded:
        resp = await api_client.get(path)
        assert resp.status == 200, path
        policy = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'", path
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'", path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
    # the rest of swagger-ui's folder is not served: its index.html loads a demo spec from the internet
    for name in (
        "index.html",
        "swagger-initializer.js",
        "oauth2-redirect.html",
        "swagger-ui-bundle.js.map",
        "swagger-ui.js",
        "favicon-32x32.png",
        "",
        "../index.html",
    ):
        resp = await api_client.get(f"/docs/assets/{name}")
        assert resp.status == 404, name
    init = await (await api_client.get("/docs/init.js")).text()
    assert "validatorUrl: null" in init  # no badge from swagger's public validator
