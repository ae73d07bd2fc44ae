"""/docs: Swagger UI over /openapi.json, from the swagger-ui-bundle package.

Every asset is served by this process from the installed package, so the page
works offline and fetches nothing from elsewhere. Our only code is the page
that points Swagger UI at /openapi.json.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/assets"

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FicMart payment gateway API</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
""".encode()

# A file of its own rather than an inline script, so a Content-Security-Policy
# of 'self' can hold.
_INIT = b"""window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});\n"""


async def page(_request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8")


async def init_script(_request: web.Request) -> web.Response:
    return web.Response(body=_INIT, content_type="text/javascript", charset="utf-8")


def setup(app: web.Application) -> None:
    app.router.add_get("/docs", page, name="docs")
    app.router.add_get("/docs/init.js", init_script, name="docs_init")
    app.router.add_static(ASSETS, Path(swagger_ui_path), name="docs_assets")
