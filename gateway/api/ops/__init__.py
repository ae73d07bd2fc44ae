"""The ops console: /ops on gateway-api, server-rendered pages for holders of an ops key.

    setup(app, settings)     mounts it (a sub-application at /ops); with
                             GATEWAY_OPS_KEYS unset every /ops page answers 404
                             "not configured"

auth.py      Basic login with an ops key, form tokens, the same-origin check
throttle.py  failed logins slowed per source and per name
port.py      what the console asks of the dead-letter desk
wiring.py    the desk on gateway/ops/replay.py and gateway/ops/deadletters.py (the only
             import of the worker in the gateway package)
actions.py   what the console changes, each with its history row
reads.py     what the pages show
render.py    Jinja2 templates, escaping and redaction
pages.py     the handlers and the console's middleware
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter

from gateway import config
from gateway.api import routes
from gateway.api.ops import auth, pages, wiring
from gateway.api.ops.port import DeadLetterDesk
from gateway.api.ops.throttle import LoginThrottle


def setup(app: web.Application, settings: config.Settings, *, desk: DeadLetterDesk | None = None) -> None:
    """Mount the console on `app` (after routes.setup: it reads the app's State). `desk` defaults to
    the worker's (its settings read from the environment, as gatewayctl reads them)."""
    operators = auth.operators_by_digest(settings.ops_keys)
    if operators and desk is None:
        state = app[routes.STATE]
        desk = wiring.worker_desk(lambda: state.pool, settings.amqp_url)
    console = web.Application(middlewares=[pages.console_middleware])
    failures = Counter(
        "gateway_ops_login_failures",
        "Failed logins to /ops: bad_credentials (counted against the source and name), locked_out (refused unread)",
        ("reason",),
        registry=app[routes.STATE].registry,
    )
    console[pages.CONSOLE] = pages.Console(operators, desk, LoginThrottle(), failures)
    pages.add_routes(console)
    app.add_subapp("/ops", console)
