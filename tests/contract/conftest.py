"""Fixtures for the bank contract suite: a REAL ``mockbank`` process per scenario.

``bank`` is the shared zero-chaos bank (MIN/MAX_LATENCY_MS=0, FAILURE_RATE=0,
LOG_LEVEL=debug), reset before every test (the shared mock-bank client's reset(),
harness/mockbank_client.py). Tests that need other start-up settings use
``running_bank(env)`` from bankclient.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.bankclient import BankClient, running_bank


@pytest.fixture(scope="session")
async def shared_bank() -> AsyncIterator[BankClient]:
    async with running_bank({"LOG_LEVEL": "debug"}) as client:
        yield client


@pytest.fixture
async def bank(shared_bank: BankClient) -> BankClient:
    await shared_bank.reset()
    return shared_bank
