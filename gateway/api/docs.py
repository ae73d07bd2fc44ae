"""/docs: Swagger UI over /openapi.json, from the swagger-ui-bundle package.

The page loads two files of the installed package, served by this process, so it
works offline and fetches nothing from elsewhere; nothing else of the package's
folder is served (its index.html would load a demo spec from a public host). Our
only code is the page that points Swagger UI at /openapi.json. Every response of
/docs carries a Content-Security-Policy that lets the page run its own scripts and
reach this origin only.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/assets"
# What the page loads from the package: these files and no other.
ASSET_FILES = ("swagger-ui.css", "swagger-ui-bundle.js")
SECURITY_HEADERS = {
    # Swagger UI styles elements from its script (inline styles) and shows data: images;
    # scripts, the spec and "Try it out" requests are this origin's alone.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FicMart payment gateway API</title>
<link rel="stylesheet" href="{ASSETS}/{ASSET_FILES[0]}"></head>
<body><div id="swagger-ui"></div>
<script src="{ASSETS}/{ASSET_FILES[1]}"></script>
<script src="/docs/init.js"></script>
</body></html>
""".encode()

# A file of its own rather than an inline script, so that the policy needs no 'unsafe-inline'
# for scripts. validatorUrl null: no badge fetched from swagger's public validator.
_INIT = b"""window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null
});
"""


async def page(_request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)


async def init_script(_request: web.Request) -> web.Response:
    return web.Response(body=_INIT, content_type="text/javascript", charset="utf-8", headers=SECURITY_HEADERS)


def _asset(path: Path):
    async def serve(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers=SECURITY_HEADERS)

    return serve


def setup(app: web.Application) -> None:
    app.router.add_get("/docs", page, name="docs")
    app.router.add_get("/docs/init.js", init_script, name="docs_init")
    for name in ASSET_FILES:
        app.router.add_get(f"{ASSETS}/{name}", _asset(Path(swagger_ui_path) / name))
