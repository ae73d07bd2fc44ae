"""worker.bank: every way the bank can answer (or not) maps to the right BankOutcome."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import aiohttp
import pytest
import structlog
from aiohttp import web
from aioresponses import aioresponses

from gateway import domain, tracing
from gateway.domain import OperationKind, Verdict
from worker.bank import BankClient

BANK = "http://bank.test"
AUTH_URL = f"{BANK}/api/v1/authorizations"
CARD = "4111111111111111"
CVV = "123"

AUTH_ID = "auth_0b6f3c1e-8a47-4c9e-9d3a-2f1e5b7c9a01"
CAP_ID = "cap_5d2e8f40-1c3b-4a6d-8e9f-0a1b2c3d4e5f"
VOID_ID = "void_9e8d7c6b-5a49-4837-a625-1403f2e1d0c9"
REF_ID = "ref_11223344-5566-4778-899a-aabbccddeeff"
APPROVED = {
    "authorization_id": AUTH_ID,
    "status": "approved",
    "amount": 500,
    "currency": "USD",
    "expires_at": "2030-01-01T00:00:00Z",
    "created_at": "2029-12-25T00:00:00Z",
}


@pytest.fixture
async def bank():
    async with BankClient(BANK, timeout=5) as client:
        yield client


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer`; supply a stub."""

    def __init__(self, method, url, **kwargs):
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Mock(aioresponses):
    def add(self, *args, **kwargs):
        kwargs.setdefault("response_class", _Response)
        return super().add(*args, **kwargs)


@pytest.fixture
def mocked():
    with _Mock() as m:
        yield m


async def _authorize(bank: BankClient, key: str = "gw-op_1") -> domain.BankOutcome:
    return await bank.authorize(key, card_number=CARD, cvv=CVV, expiry_month=12, expiry_year=2030, amount=500)


def _sent(mocked, method: str, url: str):
    (call,) = [c for (m, u), calls in mocked.requests.items() if m == method and str(u) == url for c in calls]
    return call.kwargs


KEPT = {k: APPROVED[k] for k in ("authorization_id", "status", "amount", "currency", "expires_at")}


async def test_2xx_json_is_ok_with_the_fields_we_use(bank, mocked):
    mocked.post(AUTH_URL, status=200, payload=APPROVED)
    outcome = await _authorize(bank)
    assert outcome == domain.BankOutcome("ok", http_status=200, body=KEPT)
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.SUCCEEDED


async def test_idempotency_key_and_json_body_are_sent(bank, mocked):
    mocked.post(AUTH_URL, status=200, payload=APPROVED)
    await _authorize(bank, key="gw-op_abc")
    sent = _sent(mocked, "POST", AUTH_URL)
    assert sent["headers"]["Idempotency-Key"] == "gw-op_abc"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert b'"card_number":"4111111111111111"' in sent["data"]


async def test_the_trace_goes_to_the_bank_without_any_tracestate(bank, mocked):
    """A command's headers could carry vendor data (anyone publishing on the broker): the bank
    gets our traceparent alone."""
    mocked.post(AUTH_URL, status=200, payload=APPROVED)
    traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    headers = {"traceparent": traceparent, "tracestate": "merchant=chosen"}
    with tracing.continued(headers, "process authorize", tracing.SpanKind.CONSUMER):
        await _authorize(bank)
    sent = _sent(mocked, "POST", AUTH_URL)["headers"]
    assert sent["traceparent"] == traceparent and "tracestate" not in sent


@pytest.mark.parametrize(
    "call, path, kwargs, body",
    [
        (
            "capture",
            "/api/v1/captures",
            {"authorization_id": AUTH_ID, "amount": 500},
            {"capture_id": CAP_ID, "authorization_id": AUTH_ID, "status": "captured", "amount": 500, "currency": "USD"},
        ),
        (
            "void",
            "/api/v1/voids",
            {"authorization_id": AUTH_ID},
            {"void_id": VOID_ID, "authorization_id": AUTH_ID, "status": "voided"},
        ),
        (
            "refund",
            "/api/v1/refunds",
            {"capture_id": CAP_ID, "amount": 500},
            {"refund_id": REF_ID, "capture_id": CAP_ID, "status": "refunded", "amount": 500, "currency": "USD"},
        ),
    ],
)
async def test_capture_void_refund_post_with_key(bank, mocked, call, path, kwargs, body):
    mocked.post(BANK + path, status=200, payload=body)
    outcome = await getattr(bank, call)("gw-op_x", **kwargs)
    assert outcome.kind == "ok" and outcome.body == body and not outcome.replayed
    sent = _sent(mocked, "POST", BANK + path)
    assert sent["headers"]["Idempotency-Key"] == "gw-op_x"


async def test_4xx_json_error_carries_the_code(bank, mocked):
    mocked.post(AUTH_URL, status=402, payload={"error": "insufficient_funds", "message": "not enough money"})
    outcome = await _authorize(bank)
    assert (outcome.kind, outcome.http_status, outcome.code) == ("error", 402, "insufficient_funds")
    assert outcome.body == {"error": "insufficient_funds", "message": "not enough money"}  # for ops
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.REFUSED


async def test_400_plain_text_is_unparseable_not_a_refusal(bank, mocked):
    mocked.post(AUTH_URL, status=400, body="missing Idempotency-Key header\n", content_type="text/plain")
    outcome = await _authorize(bank)
    assert (outcome.kind, outcome.http_status, outcome.code) == ("unparseable", 400, None)
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY


async def test_500_internal_error_is_retry(bank, mocked):
    mocked.post(AUTH_URL, status=500, payload={"error": "internal_error"})
    outcome = await _authorize(bank)
    assert (outcome.kind, outcome.http_status, outcome.code) == ("error", 500, "internal_error")
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY


async def test_502_html_is_unparseable(bank, mocked):
    mocked.post(AUTH_URL, status=502, body="<html><body>Bad Gateway</body></html>", content_type="text/html")
    outcome = await _authorize(bank)
    assert (outcome.kind, outcome.http_status) == ("unparseable", 502)
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY


async def test_invalid_json_200_is_unparseable(bank, mocked):
    mocked.post(AUTH_URL, status=200, body='{"authorization_id": "auth_', content_type="application/json")
    outcome = await _authorize(bank)
    assert (outcome.kind, outcome.http_status) == ("unparseable", 200)
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY


async def test_200_without_the_new_id_is_malformed(bank, mocked):
    mocked.post(AUTH_URL, status=200, payload={"status": "approved"})
    outcome = await _authorize(bank)
    assert outcome.kind == "malformed" and "authorization_id" in (outcome.message or "")
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY


async def test_timeout(bank, mocked):
    mocked.post(AUTH_URL, exception=TimeoutError())
    outcome = await _authorize(bank)
    assert outcome == domain.BankOutcome("timeout")
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY


async def test_real_timeout_fires():
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return web.json_response(APPROVED)

    app = web.Application()
    app.router.add_post("/api/v1/authorizations", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with BankClient(f"http://127.0.0.1:{port}", timeout=0.3) as client:
            assert (await _authorize(client)).kind == "timeout"
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectionError("boom"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(104, "reset"),
        aiohttp.ClientPayloadError("truncated"),
    ],
)
async def test_connection_problems(bank, mocked, exc):
    mocked.post(AUTH_URL, exception=exc)
    assert await _authorize(bank) == domain.BankOutcome("connection")


async def test_connection_refused_for_real_is_unreachable():
    async with BankClient("http://127.0.0.1:1", timeout=2) as client:
        outcome = await _authorize(client)
    assert outcome.kind == "unreachable" and not domain.may_have_acted(outcome)


async def test_gets(bank, mocked):
    mocked.get(f"{BANK}/api/v1/authorizations/{AUTH_ID}", status=200, payload=APPROVED)
    mocked.get(f"{BANK}/api/v1/captures/{CAP_ID}", status=404, payload={"error": "not_found", "message": "nope"})
    refund = {"refund_id": REF_ID, "capture_id": CAP_ID, "status": "refunded", "amount": 500, "currency": "USD"}
    mocked.get(f"{BANK}/api/v1/refunds/{REF_ID}", status=200, payload=refund)
    found = await bank.get_authorization(AUTH_ID)
    assert found.body == {k: APPROVED[k] for k in ("authorization_id", "status", "amount", "expires_at")}
    missing = await bank.get_capture(CAP_ID)
    assert (missing.kind, missing.http_status, missing.code) == ("error", 404, "not_found")
    assert (await bank.get_refund(REF_ID)).body == {
        k: refund[k] for k in ("refund_id", "status", "amount", "capture_id")
    }
    assert "Idempotency-Key" not in (_sent(mocked, "GET", f"{BANK}/api/v1/authorizations/{AUTH_ID}")["headers"] or {})


async def test_a_get_answering_about_another_object_is_malformed(bank, mocked):
    other = "auth_ffffffff-8a47-4c9e-9d3a-2f1e5b7c9a01"
    mocked.get(f"{BANK}/api/v1/authorizations/{AUTH_ID}", status=200, payload={**APPROVED, "authorization_id": other})
    assert (await bank.get_authorization(AUTH_ID)).kind == "malformed"


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"status": "declined"}, "status"),
        ({"amount": 1}, "amount"),
        ({"amount": 500.0}, "amount"),
        ({"currency": "EUR"}, "currency"),
        ({"authorization_id": "auth_1"}, "authorization_id"),
        ({"authorization_id": "auth_" + "1" * 5_000}, "authorization_id"),
        ({"authorization_id": AUTH_ID.upper().replace("AUTH_", "auth_")}, "authorization_id"),
        ({"expires_at": "next tuesday"}, "expires_at"),
        ({"expires_at": "2030-01-01T00:00:00"}, "time zone"),
        ({"expires_at": None}, "expires_at"),
    ],
)
async def test_an_approval_that_does_not_answer_our_request_is_malformed(bank, mocked, change, problem):
    mocked.post(AUTH_URL, status=200, payload={**APPROVED, **change})
    outcome = await _authorize(bank)
    assert outcome.kind == "malformed" and problem in (outcome.message or ""), outcome
    assert outcome.body is None
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY
    error = domain.error_for(outcome, OperationKind.AUTHORIZE)
    assert error["code"] == "bank_answer_invalid" and len(error["message"]) < 300


@pytest.mark.parametrize(
    "call, path, kwargs, body",
    [
        (
            "capture",
            "/api/v1/captures",
            {"authorization_id": AUTH_ID, "amount": 500},
            {
                "capture_id": CAP_ID,
                "authorization_id": "auth_aaaaaaaa-8a47-4c9e-9d3a-2f1e5b7c9a01",
                "status": "captured",
                "amount": 500,
                "currency": "USD",
            },
        ),
        (
            "void",
            "/api/v1/voids",
            {"authorization_id": AUTH_ID},
            {"void_id": VOID_ID, "authorization_id": AUTH_ID, "status": "captured"},
        ),
        (
            "refund",
            "/api/v1/refunds",
            {"capture_id": CAP_ID, "amount": 500},
            {
                "refund_id": "cap_11223344-5566-4778-899a-aabbccddeeff",
                "capture_id": CAP_ID,
                "status": "refunded",
                "amount": 500,
                "currency": "USD",
            },
        ),
    ],
)
async def test_answers_naming_something_else_are_malformed(bank, mocked, call, path, kwargs, body):
    mocked.post(BANK + path, status=200, payload=body)
    assert (await getattr(bank, call)("gw-op_x", **kwargs)).kind == "malformed"


async def test_only_the_fields_we_use_are_kept(bank, mocked):
    mocked.post(AUTH_URL, status=200, payload={**APPROVED, "card_number": CARD, "cvv": CVV, "extra": "x" * 1000})
    outcome = await _authorize(bank)
    assert outcome.kind == "ok" and outcome.body == KEPT


async def test_a_replayed_answer_says_so(bank, mocked):
    mocked.post(AUTH_URL, status=200, payload=APPROVED, headers={"X-Idempotent-Replayed": "true"})
    assert (await _authorize(bank)).replayed


async def test_unknown_error_codes_are_named_so_and_kept_short(bank, mocked):
    code = f"weird_{CARD}_" + "z" * 5000
    mocked.post(AUTH_URL, status=400, payload={"error": code, "message": f"card {CARD} cvv {CVV}"})
    outcome = await _authorize(bank)
    assert outcome.code == "unknown_bank_error" and outcome.body is not None
    assert set(outcome.body) == {"error", "bank_code", "message"} and outcome.body["error"] == outcome.code
    kept = str(outcome.body)
    assert CARD not in kept and "cvv 123" not in kept and len(kept) < 600 and "weird_" in outcome.body["bank_code"]
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY
    assert domain.may_have_acted(outcome)


async def test_a_decline_with_control_characters_keeps_them_out(bank, mocked):
    """A NUL would make the whole answer unstorable (jsonb refuses it): the decline could not
    be recorded. And what the bank says stays with ops: the merchant reads our words."""
    said = "declined\u0000\u0007 \u202ecall +1 555 0100 about card " + CARD[:8] + "\u0000" + CARD[8:]
    mocked.post(AUTH_URL, status=402, payload={"error": "insufficient_funds", "message": said})
    outcome = await _authorize(bank)
    assert outcome.code == "insufficient_funds" and outcome.body is not None
    assert outcome.body["message"].isprintable() and CARD not in outcome.body["message"]
    assert outcome.body["message"].startswith("declined call +1 555 0100 about card [redacted]")
    error = domain.error_for(outcome, OperationKind.AUTHORIZE)
    assert error == {
        "code": "insufficient_funds",
        "message": domain.BANK_ERRORS["insufficient_funds"],
        "retryable": False,
    }


async def test_no_card_data_in_outcomes_or_logs(bank, mocked, caplog, capsys):
    """Even a bank or a library that echoes the card number must not leak it."""
    echoed = f"card {CARD} cvv {CVV} declined"
    mocked.post(AUTH_URL, status=400, payload={"error": "invalid_card", "message": echoed})
    mocked.post(AUTH_URL, exception=aiohttp.ClientConnectionError(f"reset while sending {CARD}"))
    mocked.post(AUTH_URL, status=500, body=f"<html>{CARD}</html>", content_type="text/html")
    with structlog.testing.capture_logs() as logged:
        outcomes = [await _authorize(bank) for _ in range(3)]
    assert outcomes[0].code == "invalid_card" and CARD not in str(outcomes[0].body)
    error = domain.error_for(outcomes[0])
    texts = [repr(o) for o in outcomes[1:]] + [repr(logged), caplog.text, str(error), *capsys.readouterr()]
    for text in texts:
        assert not re.search(r"\d{13,19}", text), text


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_never_followed(status):
    """A bank answering 3xx must not make us resend the card and key elsewhere, nor count as success."""
    received: list[bytes] = []

    async def elsewhere(request):
        received.append(await request.read())
        return web.json_response(APPROVED)

    target_app = web.Application()
    target_app.router.add_route("*", "/x", elsewhere)
    target, target_url = await _serve(target_app)

    async def redirect(_request):
        return web.Response(status=status, headers={"Location": f"{target_url}/x"})

    bank_app = web.Application()
    bank_app.router.add_post("/api/v1/authorizations", redirect)
    bank_runner, bank_url = await _serve(bank_app)
    try:
        async with BankClient(bank_url, timeout=5) as client:
            outcome = await _authorize(client)
    finally:
        await bank_runner.cleanup()
        await target.cleanup()
    assert received == []
    assert (outcome.kind, outcome.http_status) == ("redirect", status)
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY
    assert domain.error_for(outcome)["code"] == "bank_redirect"


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_huge_body_is_not_read_past_the_bound(chunked):
    from worker.bank import MAX_BODY_BYTES

    async def huge(request):
        if not chunked:
            return web.Response(body=b"x" * (MAX_BODY_BYTES + 1), content_type="application/json")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b" " * 65536)
        return resp

    app = web.Application()
    app.router.add_post("/api/v1/authorizations", huge)
    runner, url = await _serve(app)
    try:
        async with BankClient(url, timeout=5) as client:
            outcome = await _authorize(client)
    finally:
        await runner.cleanup()
    assert outcome.kind == "oversized"
    assert domain.classify(OperationKind.AUTHORIZE, outcome) is Verdict.RETRY
