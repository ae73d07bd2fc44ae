"""Schemathesis against /openapi.json: no input, valid or not, gets a 5xx or a non-JSON answer.

The API runs in its own thread and event loop (with its own pool) on a real
port, because schemathesis drives it with blocking HTTP calls. Every
operation gets a bounded number of schema-conforming and of schema-violating
requests; each answer must be a 2xx/4xx (503 never: the database is up), carry
X-Request-Id and, except /docs, be a JSON body that conforms to
the document (status code, content type, headers, schema).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Self

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from gateway import db
from gateway.api.app import create_app
from tests.integration.conftest import API_KEY

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 40}
BUDGET_SECONDS = 50  # stop starting new operations past this; the whole test stays under a minute


class ServerThread:
    def __init__(self, settings, database_url: str):
        self._settings = settings
        self._database_url = database_url
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="api-under-fuzz", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(30) or self.error:
            raise RuntimeError(f"the API did not start: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        pool = await db.create_pool(self._database_url, min_size=1, max_size=5)
        runner = web.AppRunner(create_app(self._settings, pool), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await pool.close()


@pytest.fixture(scope="module")
def live_api(api_settings, database_url, api_logs):
    with ServerThread(api_settings, database_url) as server:
        yield f"http://127.0.0.1:{server.port}"


# Schemathesis' per-response checks. Left out: positive_data_acceptance (the document
# cannot express "exactly one of order_id or customer_id", Luhn or "not expired", so
# schema-valid input is legitimately refused with 422 there) and the stateful ones.
CHECK_NAMES = {
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
}


def _checks():
    load_all_checks()
    return [c for c in CHECKS.get_all() if c.__name__ in CHECK_NAMES]


def test_fuzz_every_operation(live_api):
    doc = requests.get(f"{live_api}/openapi.json", timeout=10).json()
    # The API key is sent with every request (below); schemathesis does not generate
    # or mutate the Authorization header itself (auth has its own tests).
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    schema = schemathesis.openapi.from_dict(doc, config=config)
    fuzz = Fuzz(live_api)
    deadline = time.monotonic() + BUDGET_SECONDS
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():
            if time.monotonic() > deadline:
                break
            if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
                continue
            fuzz.run(operation, mode, examples)
            ran += 1
    assert ran >= 10
    print(*sorted(fuzz.seen.items()), sep="\n")
    # The fuzzing reached the interesting answers, not only the early refusals.
    assert fuzz.seen[("POST", "/v1/payments", "positive", 202)] > 0


class Fuzz:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session = requests.Session()
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.checks = _checks()
        self.seen: Counter = Counter()  # (method, path, mode, status) -> count

    def run(self, operation, mode: GenerationMode, examples: int) -> None:
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE and operation.path == "/v1/payments" and operation.method == "post":
            strategy = strategy.map(_plausible_card)

        @given(case=strategy)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def one(case):
            self.check(case, operation.path, mode)

        one()

    def check(self, case, path: str, mode: GenerationMode) -> None:
        response = case.call(base_url=self.base_url, session=self.session, headers=self.headers, timeout=15)
        self.seen[(case.method, path, mode.value, response.status_code)] += 1
        assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:500])
        received = {k.lower(): v for k, v in response.headers.items()}  # name -> list of values
        assert received.get("x-request-id"), received
        if path != "/docs":
            assert received["content-type"][0].startswith("application/json"), received
            response.json()
        case.validate_response(response, checks=self.checks, headers=self.headers)


def _plausible_card(case):
    """Random schema-valid cards almost never pass Luhn and are mostly expired: mend half of them."""
    card = case.body.get("card") if isinstance(case.body, dict) else None
    if isinstance(card, dict) and isinstance(card.get("number"), str) and card["number"][-1] in "02468":
        digits = card["number"][:-1]
        card["number"] = digits + str(_luhn_digit(digits))
        card["expiry_year"] = max(card.get("expiry_year", 0), datetime.now(UTC).year + 1)
    return case


def _luhn_digit(digits: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10


def _has_inputs(operation) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))
