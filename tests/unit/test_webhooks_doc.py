"""docs/webhooks.md's receiver, as a shop would copy it, accepts what the gateway signs and
refuses what it must (another secret, an old timestamp, a changed body)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gateway.webhook_rules import signature

DOC = Path(__file__).parents[2] / "docs" / "webhooks.md"


@pytest.fixture(scope="module")
def receiver() -> dict:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation's example
    namespace["SECRETS"][:] = ["whsec_new", "whsec_old"]
    return namespace


def test_the_documented_receiver_verifies_the_gateways_signatures(receiver):
    verified = receiver["verified"]
    body = b'{"event_id":"evt_1","type":"payment.captured"}'
    now = int(time.time())
    assert verified(signature(["whsec_new"], now, body), body)
    assert verified(signature(["whsec_other", "whsec_old"], now, body), body)  # rotating: any v1 may match
    assert not verified(signature(["whsec_other"], now, body), body)
    assert not verified(signature(["whsec_new"], now - 301, body), body)  # outside the 5-minute tolerance
    assert not verified(signature(["whsec_new"], now, body), body + b" ")
    assert not verified("", body)
