"""The permissions of a merchant's broker account and the checks of gatewayctl broker-account."""

from __future__ import annotations

import re

import pytest

from gateway.config import ConfigError
from gatewayctl import brokeraccount
from gatewayctl.brokeraccount import BrokerAdminSettings


def allowed(pattern: str, name: str) -> bool:
    """As RabbitMQ applies a permission: an unanchored regular expression search."""
    return re.search(pattern, name) is not None


def test_a_merchant_may_use_its_own_queues_and_read_its_own_events_only():
    perms = brokeraccount.permissions("my-shop")
    for kind in (perms.configure, perms.write, perms.read):
        assert allowed(kind, "my-shop.payments")
        for theirs in ("payments.commands", "payments.work", "payments.dead", "amq.default", "my-shop", "shop.x"):
            assert not allowed(kind, theirs), (kind, theirs)
        assert not allowed(kind, "my-shop-2.payments") and not allowed(kind, "my.payments")
    assert allowed(perms.read, "payments.events.my-shop")
    for other in ("payments.events.my-shop-2", "payments.events.other", "payments.events", "payments.events.my"):
        assert not allowed(perms.read, other), other
    assert not allowed(perms.configure, "payments.events.my-shop")  # declared by the gateway, not by it
    assert not allowed(perms.write, "payments.events.my-shop")  # nobody but the relay publishes there


def test_only_configured_merchants_whose_prefix_is_theirs_get_an_account():
    assert brokeraccount.refusal("ficmart", {"ficmart", "payments"}) is None
    assert "not a merchant of GATEWAY_API_KEYS" in (brokeraccount.refusal("other", {"ficmart"}) or "")
    for reserved in ("payments", "amq"):
        assert "named like ours" in (brokeraccount.refusal(reserved, {reserved}) or "")


@pytest.mark.parametrize(
    ("amqp_url", "vhost"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "/"),
        ("amqp://guest:guest@127.0.0.1:5672", "/"),
        ("amqp://gw:pw@mq1:5672/gateway,amqp://gw:pw@mq2:5672/gateway", "gateway"),
        ("amqp://gw:pw@mq1:5672/%2Fprod", "/prod"),
    ],
)
def test_the_vhost_is_amqp_urls(amqp_url, vhost):
    assert brokeraccount.vhost_of(amqp_url) == vhost


def test_the_management_url_is_checked():
    assert BrokerAdminSettings.parse({}).management_url == "http://guest:guest@127.0.0.1:15672/"
    with pytest.raises(ConfigError, match="must name the management user"):
        BrokerAdminSettings.parse({"RABBITMQ_MANAGEMENT_URL": "http://mq:15672/"})
    with pytest.raises(ConfigError, match="RABBITMQ_MANAGEMENT_URL must be a http/https URL"):
        BrokerAdminSettings.parse({"RABBITMQ_MANAGEMENT_URL": "ftp://a:b@mq/"})
    remote = BrokerAdminSettings.parse({"RABBITMQ_MANAGEMENT_URL": "http://admin:s3cret@mq:15672/"})
    with pytest.raises(ConfigError, match="must be https") as refused:
        remote.checked(development=False)
    assert "s3cret" not in str(refused.value)
    assert remote.checked(development=True) is remote
