"""Merchants' broker accounts (gatewayctl broker-account) as the tests use them: a merchant's
AMQP URL from the command's JSON, the users removed afterwards, a refusal told apart."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlparse

import aiohttp
from aiormq.exceptions import ChannelAccessRefused

# RabbitMQ's management API (scripts/services.sh enables it on the local broker).
MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")


def account_url(amqp_url: str, account: dict) -> str:
    """The gateway's AMQP URL (its vhost) with the merchant's user and password."""
    node = urlparse(amqp_url)
    return node._replace(netloc=f"{quote(account['user'])}:{account['password']}@{node.hostname}:{node.port}").geturl()


async def management(method: str, *path: str) -> Any:
    """A call of the management API (path parts quoted); its JSON answer, None when it has none."""
    parsed = urlparse(MANAGEMENT_URL)
    base = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/")
    headers = {"Authorization": aiohttp.encode_basic_auth(parsed.username or "", parsed.password or "")}
    url = "/".join([f"{base}/api", *(quote(part, safe="") for part in path)])
    async with aiohttp.ClientSession(headers=headers) as session, session.request(method, url) as resp:
        return await resp.json() if resp.content_type == "application/json" else None


async def delete_users(users: list[str]) -> None:
    """Users outlive the test's vhost: removed by the test that made them."""
    for user in users:
        await management("DELETE", "users", user)


async def refused(attempt: Callable[[], Awaitable[object]]) -> bool:
    """True when the broker refuses `attempt` with ACCESS_REFUSED (which closes its channel)."""
    try:
        await attempt()
    except ChannelAccessRefused:
        return True
    return False
