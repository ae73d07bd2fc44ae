"""Where the tests find PostgreSQL and RabbitMQ, with a private database and vhost per run.

DATABASE_URL and AMQP_URL from the environment name servers to use (default:
the local services). Without them, and where a Docker engine answers,
testcontainers starts throwaway ones instead. Either way each test run works
in its own database and its own RabbitMQ vhost, so runs never collide.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from contextlib import ExitStack, asynccontextmanager, contextmanager
from urllib.parse import quote, urlparse, urlunparse

import asyncpg

from gateway import db

LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def server_urls(stack: ExitStack) -> tuple[str, str]:
    """(postgres admin URL, amqp URL) of the servers to test against."""
    db, amqp = os.environ.get("DATABASE_URL"), os.environ.get("AMQP_URL")
    if (db is None or amqp is None) and os.environ.get("GATEWAY_TESTS_LOCAL") != "1" and _docker_available():
        if db is None:
            from testcontainers.postgres import PostgresContainer

            pg = stack.enter_context(PostgresContainer("postgres:16-alpine", driver=None))
            db = pg.get_connection_url()
        if amqp is None:
            from testcontainers.rabbitmq import RabbitMqContainer

            rabbit = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-management-alpine"))
            amqp = f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
    return db or LOCAL_DATABASE_URL, amqp or LOCAL_AMQP_URL


def with_database(url: str, name: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{name}"))


async def create_database(admin_url: str) -> str:
    name = f"gwtest_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(with_database(admin_url, _admin_db(admin_url)))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = with_database(admin_url, name)
    await _wait_until_standbys_have(url)
    return url


async def _wait_until_standbys_have(url: str, timeout: float = 30.0) -> None:
    """With a multi-host URL, asyncpg also opens the standbys it then turns down, and a
    standby that has not replayed CREATE DATABASE yet fails the whole connect (it moves on
    only after network errors): wait until a connection succeeds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await (await asyncpg.connect(url)).close()
            return
        except asyncpg.InvalidCatalogNameError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def drop_database(admin_url: str, url: str) -> None:
    name = urlparse(url).path.lstrip("/")
    conn = await asyncpg.connect(with_database(admin_url, _admin_db(admin_url)))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def ensure_database(url: str) -> bool:
    """Create the database of ``url`` if it does not exist (through the server's postgres
    database); True when it was created."""
    name = urlparse(url).path.lstrip("/")
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()


def _admin_db(url: str) -> str:
    return urlparse(url).path.lstrip("/") or "postgres"


def create_vhost(amqp_url: str) -> tuple[str, str | None]:
    """(URL of a private vhost, its name) where rabbitmqctl is at hand; else the URL as given.
    A cluster's AMQP_URL (comma-separated nodes) gives each node's URL the vhost; rabbitmqctl
    talks to the node RABBITMQ_NODENAME names (scripts/ha/ha.sh env sets it)."""
    nodes = [urlparse(node.strip()) for node in amqp_url.split(",")]
    parts = nodes[0]
    local = all(node.hostname in ("127.0.0.1", "localhost", "::1") for node in nodes)
    ctl = shutil.which("rabbitmqctl")
    if not (local and ctl):
        return amqp_url, None
    vhost = f"gwtest_{uuid.uuid4().hex[:12]}"
    user = parts.username or "guest"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run(
        [ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"], check=True, capture_output=True, timeout=60
    )
    path = "/" + quote(vhost, safe="")
    return ",".join(urlunparse(node._replace(path=path)) for node in nodes), vhost


def delete_vhost(vhost: str | None) -> None:
    ctl = shutil.which("rabbitmqctl")
    if vhost and ctl:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


@asynccontextmanager
async def private_database(admin_url: str):
    """A new database with schema.sql applied; dropped on the way out."""
    url = await create_database(admin_url)
    try:
        await db.migrate(url)
        yield url
    finally:
        await drop_database(admin_url, url)


@contextmanager
def private_vhost(amqp_url: str):
    """A new RabbitMQ vhost where rabbitmqctl is at hand (else the URL as given); deleted after."""
    url, vhost = create_vhost(amqp_url)
    try:
        yield url
    finally:
        delete_vhost(vhost)
