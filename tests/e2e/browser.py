"""Headless Chromium for the e2e tests, driven by Playwright (Python).

Debian's `chromium` package, not a browser Playwright downloads: no
`playwright install` anywhere. Each context gets a fresh profile directory.
Where the binary is missing the browser tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def chromium() -> Path | None:
    if CHROMIUM.exists():
        return CHROMIUM
    found = shutil.which("chromium")
    return Path(found) if found else None


needs_chromium = pytest.mark.skipif(
    chromium() is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium); the browser tests need /usr/bin/chromium",
)


@contextlib.asynccontextmanager
async def browser(
    *, username: str | None = None, password: str | None = None, viewport: tuple[int, int] = (1360, 900)
) -> AsyncIterator[BrowserContext]:
    """A headless Chromium context with a fresh profile; with a user name and password it answers
    HTTP Basic challenges with them (the ops console's login)."""
    executable = chromium()
    if executable is None:
        raise RuntimeError("Chromium is not installed (apt-get install -y chromium)")
    credentials = {"username": username or "", "password": password} if password is not None else None
    with tempfile.TemporaryDirectory(prefix="gateway-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(executable),
                headless=True,
                args=list(ARGS),
                http_credentials=credentials,
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            try:
                yield context
            finally:
                await context.close()
