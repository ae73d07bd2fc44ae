"""Shared fixtures: a private database (schema applied) and RabbitMQ vhost per test run."""

from __future__ import annotations

import base64
import os
from contextlib import ExitStack

import pytest

from gateway import db
from harness import services

DEV_CARD_KEY = base64.b64encode(b"k" * 32).decode()

# The tests run the published development keys, which only development mode accepts; the
# processes they start inherit this (tests of production mode set GATEWAY_ENV themselves).
os.environ.setdefault("GATEWAY_ENV", "development")


@pytest.fixture(scope="session")
def server_urls():
    with ExitStack() as stack:
        yield services.server_urls(stack)


@pytest.fixture(scope="session")
async def database_url(server_urls):
    async with services.private_database(server_urls[0]) as url:
        yield url


@pytest.fixture(scope="session")
def amqp_url(server_urls):
    with services.private_vhost(server_urls[1]) as url:
        yield url


@pytest.fixture(scope="session")
async def pool(database_url):
    p = await db.create_pool(database_url, min_size=1, max_size=20)
    yield p
    await p.close()


@pytest.fixture(scope="session")
def card_key() -> str:
    return os.environ.get("CARD_ENCRYPTION_KEY", DEV_CARD_KEY)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: a check that did not run proved nothing."""
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and session.exitstatus == pytest.ExitCode.OK:
        print(f"\nCI: {skipped} test(s) skipped; in CI a skipped test fails the run")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
