"""gatewayctl broker-account: a merchant's own RabbitMQ account, to read its own events.

The gateway's vhost is one trust zone for the gateway's processes only. A merchant reads
its events with an account of its own, whose permissions (RabbitMQ's configure, write and
read regular expressions, on this vhost) reach nothing of the gateway's and nothing of
another merchant's:

    configure, write   ^<merchant>\\.           its own queues (and exchanges): declare, delete,
                                               bind (queue.bind needs write on the queue)
    read               ^<merchant>\\.  and      consume its queues; bind them to its events
                       payments.events.<merchant>

So it cannot publish anywhere of ours (payments.commands, the default exchange, the retry
exchange), bind anything to payments.commands, or read another merchant's exchange or queues.
A merchant's name is lowercase letters, digits, '_' and '-' (gateway.config), so the prefix
`<merchant>.` is nobody else's; `payments` and `amq` are refused, their prefixes being the
gateway's and RabbitMQ's own names. Topic permissions are not needed: the exchange is the
merchant's alone. The account's connections and channels are limited, and an operator policy
bounds each of its queues (the oldest events dropped past it), so that a merchant cannot
exhaust the broker the gateway's commands go through.

The account is made through the management HTTP API (RABBITMQ_MANAGEMENT_URL, a user with the
`administrator` tag); running the command again gives the user a new password (rotation) and
sets the permissions again. The password is printed once, never stored.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import textwrap
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, unquote, urlparse

import aiohttp
import orjson
from pydantic import Field, field_validator

from gateway import broker, config, messages
from gateway.config import ConfigError, EnvSettings
from gateway.config.checks import checked_url, is_loopback, shown_url
from gatewayctl.kit import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, FORMATTER, json_flag

# Names whose `<name>.` prefix is someone else's: the gateway's exchanges and queues, RabbitMQ's.
RESERVED_NAMES = ("payments", "amq")
REQUEST_TIMEOUT = 15.0
# What one merchant may take of the broker that carries the gateway's own commands: one that
# stops reading must not fill its disk, one that leaks connections must not exhaust it. An
# operator policy (which a user's own queue arguments cannot raise) bounds each of its queues;
# past the bound the oldest events are dropped: each is also readable by polling the payment.
MAX_QUEUED_EVENTS = 100_000
MAX_CONNECTIONS = 20
MAX_CHANNELS = 100


class BrokerAdminSettings(EnvSettings):
    """RABBITMQ_MANAGEMENT_URL."""

    management_url: str = Field(
        default="http://guest:guest@127.0.0.1:15672/",
        validation_alias="RABBITMQ_MANAGEMENT_URL",
        description="RabbitMQ's management HTTP API, with a user of the administrator tag "
        "(https unless a loopback host or GATEWAY_ENV=development); used by gatewayctl broker-account",
    )

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, value: str) -> str:
        parsed = urlparse(checked_url("RABBITMQ_MANAGEMENT_URL", value, ("http", "https")))
        if not parsed.username or parsed.password is None:
            raise ConfigError(
                f"RABBITMQ_MANAGEMENT_URL must name the management user, http://user:password@host:15672/, "
                f"got {shown_url(value)}"
            )
        return value

    def checked(self, *, development: bool) -> BrokerAdminSettings:
        """The administrator's password travels in every request: in clear only within this
        machine, or in development mode."""
        parsed = urlparse(self.management_url)
        if parsed.scheme != "https" and not development and not is_loopback(parsed.hostname or ""):
            raise ConfigError(
                "RABBITMQ_MANAGEMENT_URL must be https unless its host is a loopback address or "
                f"GATEWAY_ENV=development, got {shown_url(self.management_url)}"
            )
        return self


# ---- what the account may do -------------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


def queue_prefix(merchant: str) -> str:
    return f"{merchant}."


def permissions(merchant: str) -> Permissions:
    own = "^" + re.escape(queue_prefix(merchant))
    events = re.escape(messages.events_exchange(merchant))
    return Permissions(configure=own, write=own, read=f"^({re.escape(queue_prefix(merchant))}.*|{events})$")


def refusal(merchant: str, known: set[str]) -> str | None:
    """Why `merchant` cannot have an account, or None."""
    if merchant not in known:
        listed = ", ".join(sorted(known)) or "none"
        return f"{merchant!r} is not a merchant of GATEWAY_API_KEYS (those are: {listed})"
    if merchant in RESERVED_NAMES:
        return f"a merchant named {merchant!r} cannot have a broker account: its queues would be named like ours"
    return None


def vhost_of(amqp_url: str) -> str:
    """The vhost AMQP_URL names (its first node's; RabbitMQ's default `/` when none)."""
    path = urlparse(broker.node_urls(amqp_url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


# ---- the management API ------------------------------------------------------------------------


class ManagementError(Exception):
    """The management API could not be reached, or refused what we asked."""


class Management:
    """The few calls of RabbitMQ's management HTTP API the command makes."""

    def __init__(self, url: str, session: aiohttp.ClientSession):
        parsed = urlparse(url)
        self._base = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/api"
        self._headers = {
            "Authorization": aiohttp.encode_basic_auth(unquote(parsed.username or ""), unquote(parsed.password or ""))
        }
        self._session = session
        self.shown = shown_url(url)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        try:
            async with self._session.request(
                method,
                f"{self._base}/{path}",
                json=body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ManagementError(
                f"cannot reach RabbitMQ's management API at {self.shown}: {type(exc).__name__}: {exc}"
            ) from None
        if resp.status in (401, 403):
            raise ManagementError(
                f"RabbitMQ's management API at {self.shown} refused us ({resp.status}): a wrong user or "
                "password, or a user without the administrator tag"
            )
        if resp.status >= 400 and resp.status != 404:
            raise ManagementError(f"RabbitMQ's management API: {method} {path} answered {resp.status} {text[:200]}")
        return resp.status

    async def user_exists(self, user: str) -> bool:
        return await self._call("GET", f"users/{_part(user)}") != 404

    async def put_user(self, user: str, password: str) -> None:
        # No tags: the account cannot use the management UI or API.
        await self._call("PUT", f"users/{_part(user)}", {"password": password, "tags": ""})

    async def set_permissions(self, vhost: str, user: str, allowed: Permissions) -> None:
        if await self._call("PUT", f"permissions/{_part(vhost)}/{_part(user)}", asdict(allowed)) == 404:
            raise ManagementError(f"RabbitMQ has no vhost {vhost!r} (AMQP_URL)")

    async def set_user_limits(self, user: str, limits: dict[str, int]) -> None:
        for name, value in limits.items():
            await self._call("PUT", f"user-limits/{_part(user)}/{name}", {"value": value})

    async def set_queue_bound(self, vhost: str, name: str, pattern: str, max_length: int) -> None:
        body = {"pattern": pattern, "definition": {"max-length": max_length}, "apply-to": "queues", "priority": 0}
        if await self._call("PUT", f"operator-policies/{_part(vhost)}/{_part(name)}", body) == 404:
            raise ManagementError(f"RabbitMQ has no vhost {vhost!r} (AMQP_URL)")

    async def declare_topic_exchange(self, vhost: str, name: str) -> None:
        """As the relay declares it (durable topic), so the merchant can bind before its first event."""
        body = {"type": "topic", "durable": True, "auto_delete": False, "internal": False, "arguments": {}}
        if await self._call("PUT", f"exchanges/{_part(vhost)}/{_part(name)}", body) == 404:
            raise ManagementError(f"RabbitMQ has no vhost {vhost!r} (AMQP_URL)")


def _part(name: str) -> str:
    return quote(name, safe="")


# ---- the command -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    merchant: str
    user: str
    password: str
    created: bool
    vhost: str
    exchange: str
    queue_prefix: str
    permissions: Permissions
    limits: dict[str, int]


def queue_policy(merchant: str) -> str:
    """The name of the operator policy that bounds the merchant's queues."""
    return f"gateway-merchant-{merchant}"


async def make_account(management: Management, merchant: str, user: str, vhost: str) -> Account:
    """The merchant's user with a new password, its permissions and limits, its events exchange."""
    exchange = messages.events_exchange(merchant)
    await management.declare_topic_exchange(vhost, exchange)
    created = not await management.user_exists(user)
    password = secrets.token_urlsafe(24)
    await management.put_user(user, password)
    allowed = permissions(merchant)
    await management.set_permissions(vhost, user, allowed)
    user_limits = {"max-connections": MAX_CONNECTIONS, "max-channels": MAX_CHANNELS}
    await management.set_user_limits(user, user_limits)
    await management.set_queue_bound(vhost, queue_policy(merchant), allowed.configure, MAX_QUEUED_EVENTS)
    limits = {**user_limits, "max-length": MAX_QUEUED_EVENTS}
    return Account(merchant, user, password, created, vhost, exchange, queue_prefix(merchant), allowed, limits)


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "broker-account",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="a merchant's own RabbitMQ account, to read its events",
        description=__doc__.split("\n\n", 1)[1],
        epilog=textwrap.fill(
            config.epilog(BrokerAdminSettings)
            + " Also AMQP_URL (its vhost and host), GATEWAY_API_KEYS (the merchants) and GATEWAY_ENV.",
            79,
        ),
    )
    p.add_argument("--merchant", required=True, metavar="NAME", help="a caller's name in GATEWAY_API_KEYS")
    p.add_argument(
        "--user",
        metavar="USER",
        help="the broker user's name (default: the merchant's; name it when one broker serves several gateways)",
    )
    p.set_defaults(
        handler=lambda args, settings: make_for(settings, args.merchant, args.user or args.merchant, as_json=args.json)
    )


async def make_for(settings: config.Settings, merchant: str, user: str, *, as_json: bool) -> int:
    """Make (or give a new password to) the merchant's account, and print how to use it."""
    admin = BrokerAdminSettings.load()
    try:
        admin.checked(development=settings.development)
    except ConfigError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = refusal(merchant, set(settings.api_keys.values()))
    if problem:
        print(f"gatewayctl: {problem}", file=sys.stderr)
        return EXIT_USAGE
    async with aiohttp.ClientSession() as session:
        try:
            account = await make_account(
                Management(admin.management_url, session),
                merchant,
                user,
                vhost_of(settings.amqp_url),
            )
        except ManagementError as exc:
            print(f"gatewayctl: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    if as_json:
        print(orjson.dumps(asdict(account), option=orjson.OPT_INDENT_2).decode())
    else:
        print(_instructions(account, settings.amqp_url))
    return EXIT_OK


def _instructions(account: Account, amqp_url: str) -> str:
    node = urlparse(broker.node_urls(amqp_url)[0])
    url = (
        f"{node.scheme}://{account.user}:{account.password}@{node.hostname}:{node.port or 5672}/{_part(account.vhost)}"
    )
    return "\n".join(
        [
            f"broker account of merchant {account.merchant}: {'created' if account.created else 'new password'}",
            f"  user      {account.user}",
            f"  password  {account.password}   (shown once; run this again for a new one)",
            f"  vhost     {account.vhost}",
            f"  events    topic exchange {account.exchange}, routing keys payment.<status>",
            f"  queues    named {account.queue_prefix}<anything>; nothing else on this vhost",
            f"  limits    {MAX_CONNECTIONS} connections, {MAX_CHANNELS} channels, {MAX_QUEUED_EVENTS} events "
            "per queue (then the oldest are dropped; every event is also readable by polling)",
            "",
            "Give the merchant (as this gateway reaches the broker):",
            f"  {url}",
            "and how to bind, e.g. with aio-pika:",
            f'  queue = await channel.declare_queue("{account.queue_prefix}payments", durable=True)',
            f'  await queue.bind("{account.exchange}", routing_key="#")   # or payment.captured, ...',
            "Events are delivered at least once: dedupe on event_id.",
        ]
    )
