"""The interactive docs page works with no internet: its assets come from the app itself, and a
headless Chromium renders the operations from them."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer
from tests.helpers import AUTH

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The machine's network has no internet; these flags keep Chromium from trying to reach it.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=20000",
]  # fmt: skip


async def test_docs_page_references_only_the_apps_own_assets(live_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, headers=AUTH) as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets
        assert all(a.startswith("/docs/assets/") for a in assets), assets
        for asset in assets:
            assert (await http.get(asset)).status_code == 200, asset


@pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium here: install Debian's 'chromium' (.ci/run does)"
)
async def test_docs_page_lists_the_operations_in_a_browser(live_server: LiveServer, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}", "--dump-dom", f"{live_server.url}/docs",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    dom, _ = await asyncio.wait_for(browser.communicate(), 120)
    html = dom.decode()
    # Swagger UI rendered the OpenAPI document into operations, from the app's own assets.
    for summary in ("Define an asset", "Open a wallet", "Spend (user to revenue)", "One transaction"):
        assert summary in html, summary
    assert "/v1/wallets/{user_id}/spends" in html
    assert "Failed to load API definition" not in html
    # The document declares the bearer scheme, so Swagger UI offers its Authorize button.
    assert "Authorize" in html
