"""The sandbox page in a real browser: Debian's headless Chromium driven by selenium through
/usr/bin/chromedriver (nothing is downloaded). The whole incident flow by hand: the requester
types /run, tries Approve (refused, a toast), the approver approves, the summary shows; a
reload in the middle keeps the conversation. And a message sent while the page is still
connecting shows once it is."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.frontends.sandbox import (
    APPROVER,
    INCIDENT_CHAT,
    REQUESTER,
    build_sandbox_app,
    make_standin,
)
from agent.http_server import HttpServer
from agent.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium under selenium, through the system chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1100,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


async def _until(check: Callable[[], object], timeout: float = 60) -> object:
    """Poll a browser-side condition (selenium is synchronous: run it off the loop). The
    timeout bounds a failure, not the speed: in the suite, Chromium shares two loaded cores."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"the page never showed it: {check}")
        await asyncio.sleep(0.1)


async def test_the_incident_flow_by_hand_in_a_real_browser(
    settings: Settings, browser: object, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from agent.frontends.sandbox import running_sandbox

    driver = browser  # type: ignore[assignment]
    async with running_sandbox(settings, port=0) as sandbox:
        await asyncio.to_thread(driver.get, sandbox.url)  # type: ignore[attr-defined]

        def messages() -> list[str]:
            try:
                found = driver.find_elements(By.CSS_SELECTOR, "#messages .msg")  # type: ignore[attr-defined]
                return [m.text for m in found]
            except StaleElementReferenceException:  # re-rendered meanwhile: look again
                return []

        def as_person(user_id: int) -> None:
            Select(driver.find_element(By.ID, "person")).select_by_value(str(user_id))  # type: ignore[attr-defined]

        await _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#person option"))  # type: ignore[attr-defined]
        await asyncio.to_thread(as_person, REQUESTER.user_id)
        box = driver.find_element(By.ID, "text")  # type: ignore[attr-defined]
        await asyncio.to_thread(box.send_keys, "/run incident: API latency spike\n")

        def button(label: str) -> object:
            try:
                buttons = driver.find_elements(By.CSS_SELECTOR, ".keyboard button")  # type: ignore[attr-defined]
                return next((b for b in buttons if label in b.text), None)
            except StaleElementReferenceException:
                return None

        def click(label: str) -> bool:
            """Tap a button; the list re-renders on every update, so retry a stale one."""
            try:
                found = button(label)
                if found is None:
                    return False
                found.click()  # type: ignore[attr-defined]
                return True
            except StaleElementReferenceException:
                return False

        # Free text: the bot answers with the runbook it matched; only ▶ Start starts it.
        await _until(lambda: click("▶ Start"))
        # The requester may not approve: the bot's alert shows as a toast, nothing changes.
        await _until(lambda: click("Approve"))
        toast = await _until(
            lambda: [t.text for t in driver.find_elements(By.CSS_SELECTOR, ".toast.alert")]  # type: ignore[attr-defined]
        )
        assert "may not decide" in " ".join(toast)  # type: ignore[arg-type]
        assert "group:approvers" in " ".join(toast)  # type: ignore[arg-type]

        # A reload in the middle keeps the conversation (the stand-in holds it).
        before = await asyncio.to_thread(messages)
        await asyncio.to_thread(driver.refresh)  # type: ignore[attr-defined]
        await _until(lambda: len(messages()) >= len(before))
        assert any("Approval needed" in text for text in await asyncio.to_thread(messages))

        await asyncio.to_thread(as_person, APPROVER.user_id)
        await _until(lambda: click("Approve"))
        # The card's edit and the summary are two messages of the chat, and a loaded
        # machine may show the summary first: wait for both.
        await _until(lambda: any("SUCCEEDED" in text for text in messages()))
        await _until(lambda: any("Approved by @sam" in text for text in messages()))
        assert not await asyncio.to_thread(button, "Approve")  # the buttons are gone

        shot = tmp_path / "sandbox.png"
        await asyncio.to_thread(driver.save_screenshot, str(shot))  # type: ignore[attr-defined]
        _assert_not_blank(shot)


async def test_a_message_sent_while_the_page_connects_is_shown(browser: object) -> None:
    """A slow event-stream connect (a loaded machine, a proxy; made a deterministic 1.5 s
    here): a message sent meanwhile still shows once the page is connected."""
    from selenium.webdriver.common.by import By

    driver = browser  # type: ignore[assignment]
    driver.execute_cdp_cmd(  # type: ignore[attr-defined]
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "const RealES = window.EventSource;"
            "window.EventSource = function (url) {"
            "  const proxy = {}; setTimeout(() => { const es = new RealES(url);"
            "  es.onopen = (e) => proxy.onopen && proxy.onopen(e);"
            "  es.onmessage = (e) => proxy.onmessage && proxy.onmessage(e); }, 1500);"
            "  return proxy; };"
        },
    )
    standin = make_standin()
    async with HttpServer(build_sandbox_app(standin)) as server:
        await asyncio.to_thread(driver.get, server.url)  # type: ignore[attr-defined]
        await _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#person option"), 10)  # type: ignore[attr-defined]
        standin.inject_message(INCIDENT_CHAT, APPROVER.user_id, "sent while connecting")

        def shown() -> bool:
            found = driver.find_elements(By.CSS_SELECTOR, "#messages .msg")  # type: ignore[attr-defined]
            return any("sent while connecting" in m.text for m in found)

        await _until(shown, 4)


def _assert_not_blank(png: Path) -> None:
    """A screenshot of a rendered page has many colours; a blank one has one or two."""
    import zlib

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            chunks.append(data[at + 8 : at + 8 + length])
        at += 12 + length
    pixels = zlib.decompress(b"".join(chunks))
    assert len(set(pixels[::97])) > 20, "the screenshot is (nearly) blank"
