"""The API's internal listener: /metrics, /healthz, /readyz and the /ops console.

They live apart from the public port (which serves /v1, /docs and /openapi.json
only), as the worker's and the relay's do: on 127.0.0.1:API_ADMIN_PORT (9100) by
default, so that nobody who can reach /v1 can probe the database, read the
metrics or try ops keys, and a scrape or a burst of probes is never refused for
load nor made to wait behind /v1. With `gateway-api --workers N` process i (from 0)
listens on API_ADMIN_PORT + i, so that every process's metrics can be scraped.

    admin_app = create_app(public_app, settings)   the same state, pool and metrics
"""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from gateway import config
from gateway.api import ops, routes
from gateway.api.errors import JSON
from gateway.api.middleware import MERCHANT, METRICS, api_middleware

DEFAULT_PORT = 9100

_HEALTHY = orjson.dumps({"status": "ok"})


class AdminSettings(config.EnvSettings):
    """API_ADMIN_PORT."""

    port: int = Field(
        default=DEFAULT_PORT,
        ge=0,
        le=65535,
        validation_alias="API_ADMIN_PORT",
        description="port of the API's /metrics, /healthz, /readyz and /ops (on --admin-host, 127.0.0.1 by "
        "default); with --workers N, process i listens on this port + i; 0: none",
    )


def create_app(public: web.Application, settings: config.Settings) -> web.Application:
    """The admin application of `public` (gateway.api.app.create_app's): its state, and so its
    pool and readiness probe, once `public` has started; its metrics registry."""
    admin = web.Application(middlewares=[api_middleware])
    admin[routes.STATE] = public[routes.STATE]
    admin[METRICS] = public[METRICS]
    admin[MERCHANT] = {}  # no API key opens anything here: /v1 answers 401, as it would to a stranger
    admin.router.add_get("/healthz", healthz, name="healthz")
    admin.router.add_get("/readyz", readyz, name="readyz")
    admin.router.add_get("/metrics", metrics, name="metrics")
    ops.setup(admin, settings)
    return admin


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=_HEALTHY, content_type=JSON)


async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[routes.STATE].readiness.check()
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return web.Response(status=200 if ready else 503, body=orjson.dumps(body), content_type=JSON)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[routes.STATE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
