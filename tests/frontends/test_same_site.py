"""`serve` against other web sites: a page elsewhere that posts to our port, a rebound host
name, a form post. Refused with or without a token (agent/frontends/same_site.py); the
clients the README shows (curl, SSE clients, generated clients) go on working."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from agent.http_server import HttpServer
from agent.settings import SecretStr, Settings
from tests.http_harness import served, wait_for_approval
from tests.support import DISK

TOKEN = "s3cret-token-for-tests"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _api_decides(settings: Settings, **update: object) -> Settings:
    """Settings under which the API's user is an approver (so a refusal is the cross-site
    rule's, never the approver rule's)."""
    return settings.model_copy(update={"approvers": ["api:http"], **update})


async def _waiting_run(client: httpx.AsyncClient, run_id: str) -> None:
    body = {"message": DISK, "run_id": run_id, "role": "runbook"}
    started = await client.post("/runs", json=body)
    assert started.status_code in (200, 201, 202), started.text
    await wait_for_approval(client, run_id)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
async def test_requests_another_site_could_make_are_refused(
    settings: Settings, token: str | None
) -> None:
    """A foreign Host (DNS rebinding), another origin's page, a form or text body: 403 with
    a JSON reason, and the run is untouched. The token changes none of it."""
    update = {"api_token": SecretStr(token)} if token else {}
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with served(_api_decides(settings, **update), headers=auth) as s:
        await _waiting_run(s.client, "x")
        attempts = [
            ("GET", "/runs", {"headers": {"Host": "rebound.example"}}),
            ("POST", "/runs/x/cancel", {"headers": {"Host": f"rebound.example:{s.server.port}"}}),
            (
                "POST",
                "/runs/x/cancel",
                {"content": "{}", "headers": {"Content-Type": "text/plain"}},
            ),
            ("POST", "/runs/x/approve", {"data": {"note": "via a form"}}),
            (
                "POST",
                "/runs/x/approve",
                {"json": {}, "headers": {"Origin": "https://attacker.example"}},
            ),
            (  # another page on this very machine, on another port
                "POST",
                "/runs/x/cancel",
                {"headers": {"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"}},
            ),
        ]
        for method, path, kwargs in attempts:
            response = await s.client.request(method, path, **kwargs)
            assert response.status_code == 403, (path, kwargs, response.text)
            assert set(response.json()) == {"error"}
        run = (await s.client.get("/runs/x")).json()
        assert run["status"] == "waiting_approval" and run["approval"] is not None


async def test_what_the_readme_shows_still_works(settings: Settings) -> None:
    """curl's bodiless POST (no type, no Origin), JSON from this server's own origin, and
    /healthz by any name (probes do not use ours) all pass."""
    async with served(_api_decides(settings)) as s:
        await _waiting_run(s.client, "ok")
        own = {"Origin": s.url, "Content-Type": "application/json"}
        assert (await s.client.post("/runs/ok/approve", headers=own, content="{}")).is_success
        assert (await s.client.get("/healthz", headers={"Host": "10.1.2.3:8766"})).is_success
        assert (await s.client.post("/runs/ok/cancel")).status_code in (200, 409)


async def test_a_configured_public_name_is_answered(settings: Settings) -> None:
    """Behind a reverse proxy the API is called by its public name: LOOM_OPS_PUBLIC_HOSTS."""
    public = settings.model_copy(update={"public_hosts": ["ops.example.com"]})
    async with served(public) as s:
        named = await s.client.get("/runs", headers={"Host": "ops.example.com"})
        assert named.status_code == 200, named.text
        other = await s.client.get("/runs", headers={"Host": "ops.example.org"})
        assert other.status_code == 403 and "LOOM_OPS_PUBLIC_HOSTS" in other.json()["error"]


ATTACK = """<!doctype html><title>cute cats</title>
<iframe name="sink" style="display:none"></iframe>
<form id="f" method="post" target="sink" action="{api}/runs/x/approve">
  <input name="note" value="cats approve">
</form>
<script>
  fetch("{api}/runs/x/cancel", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}}, body: "{{}}"}})
    .catch(() => null)
    .then(() => fetch("{api}/runs/x/cancel", {{method: "POST", mode: "no-cors"}}))
    .catch(() => null)
    .then(() => {{ document.getElementById("f").submit(); }});
  document.querySelector("iframe").addEventListener("load", () => {{ document.title = "done"; }});
</script>"""


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium under selenium, through Debian's chromedriver."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def test_a_page_on_another_site_cannot_cancel_or_approve_a_run(
    settings: Settings, browser: object
) -> None:
    """A real browser opens a page on another origin that posts to the API, as a web page
    anywhere could: a no-cors fetch with a text body, one with none, and a form. The run
    still waits for its decision."""
    async with served(_api_decides(settings)) as s:
        await _waiting_run(s.client, "x")
        page = ATTACK.format(api=s.url)

        async def attack(_request: object) -> HTMLResponse:
            return HTMLResponse(page)

        async with HttpServer(Starlette(routes=[Route("/", attack)])) as elsewhere:
            # Another origin: `localhost` on another port, as a page in a tab would be.
            await asyncio.to_thread(browser.get, f"http://localhost:{elsewhere.port}/")  # type: ignore[attr-defined]
            for _ in range(200):
                if await asyncio.to_thread(lambda: browser.title) == "done":  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the page did not finish its requests")
        run = (await s.client.get("/runs/x")).json()
        assert run["status"] == "waiting_approval" and run["approval"] is not None, run
