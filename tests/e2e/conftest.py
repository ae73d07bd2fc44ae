"""The e2e stack: mockbank, gateway-api, gateway-relay and gateway-worker as real processes.

One stack for the whole tests/e2e package (its own database and vhost), chaos off
by default, a short retry ladder (1,2,4 s) and a fast sweeper; see tests/e2e/stack.py.
"""

from __future__ import annotations

import itertools

import pytest

from tests.e2e.stack import running_stack

_amounts = itertools.count(20_001)


@pytest.fixture(scope="package")
async def stack(server_urls, card_key):
    async with running_stack(server_urls, card_key) as s:
        yield s


@pytest.fixture
async def e2e(stack):
    """The stack with the mock's chaos switched off again (a failed test may have left it on)."""
    await stack.bank.chaos(min_latency_ms=0, max_latency_ms=20, failure_rate=0, response_loss_rate=0, down=False)
    return stack


@pytest.fixture
def client(stack):
    return stack.client(patience=60)


@pytest.fixture
def amount():
    """A fresh amount per call: the ledger's entries with it belong to one payment."""
    return lambda: next(_amounts)
