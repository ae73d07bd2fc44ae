"""Merchants' broker accounts (gatewayctl broker-account) as the tests use them: a merchant's
AMQP URL from the command's JSON, the users removed afterwards, a refusal told apart."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlparse

import aiohttp
from aiormq.exceptions import ChannelAccessRefused

# RabbitMQ's management API (scripts/services.sh enables it on the local broker).
MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")


def account_url(amqp_url: str, account: dict) -> str:
    """The gateway's AMQP URL (its vhost) with the merchant's user and password."""
    node = urlparse(amqp_url)
    return node._replace(netloc=f"{quote(account['user'])}:{account['password']}@{node.hostname}:{node.port}").geturl()


async def delete_users(users: list[str]) -> None:
    """Users outlive the test's vhost: removed by the test that made them."""
    parsed = urlparse(MANAGEMENT_URL)
    base = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/")
    headers = {"Authorization": aiohttp.encode_basic_auth(parsed.username or "", parsed.password or "")}
    async with aiohttp.ClientSession(headers=headers) as session:
        for user in users:
            async with session.delete(f"{base}/api/users/{quote(user, safe='')}"):
                pass


async def refused(attempt: Callable[[], Awaitable[object]]) -> bool:
    """True when the broker refuses `attempt` with ACCESS_REFUSED (which closes its channel)."""
    try:
        await attempt()
    except ChannelAccessRefused:
        return True
    return False
