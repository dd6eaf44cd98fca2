"""Review of the zero-credential sandbox: each test pins one defect (strict xfail)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import httpx
import pytest

from agent.frontends.sandbox import (
    APPROVER,
    INCIDENT_CHAT,
    REQUESTER,
    build_sandbox_app,
    make_standin,
)
from agent.http_server import HttpServer
from bot.standin import UploadedFile

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


async def test_a_cross_site_form_post_cannot_drive_the_sandbox() -> None:
    standin = make_standin()
    async with (
        HttpServer(build_sandbox_app(standin)) as server,
        httpx.AsyncClient(base_url=server.url) as evil,
    ):
        # What a <form enctype="text/plain"> or a no-cors fetch on another site sends:
        # a "simple" request, so the browser does no CORS preflight.
        answer = await evil.post(
            "/sandbox/say",
            content=b'{"chat_id": %d, "user_id": %d, "text": "/run incident: x"}'
            % (INCIDENT_CHAT, REQUESTER.user_id),
            headers={"content-type": "text/plain", "origin": "http://evil.example"},
        )
        assert answer.status_code in (400, 403, 415), answer.text
        assert standin.messages(INCIDENT_CHAT) == []


async def test_infinity_as_an_id_is_a_400_not_a_500() -> None:
    standin = make_standin()
    async with (
        HttpServer(build_sandbox_app(standin)) as server,
        httpx.AsyncClient(base_url=server.url) as page,
    ):
        for path, body in (
            ("/sandbox/say", b'{"chat_id": Infinity, "user_id": 1, "text": "hi"}'),
            (
                "/sandbox/tap",
                b'{"chat_id": -100777, "message_id": Infinity, "user_id": 1, "data": "x"}',
            ),
        ):
            answer = await page.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 400, (path, answer.status_code)


async def test_a_non_latin1_document_name_downloads() -> None:
    standin = make_standin()
    sent = await standin.call_method(
        "sendDocument",
        {"chat_id": INCIDENT_CHAT},
        {"document": UploadedFile("trace.html", b"<html></html>", "text/html")},
    )
    file_id = sent["document"]["file_id"]
    async with (
        HttpServer(build_sandbox_app(standin)) as server,
        httpx.AsyncClient(base_url=server.url) as page,
    ):
        answer = await page.get(f"/sandbox/documents/{file_id}", params={"name": "報告.html"})
        assert answer.status_code == 200
        assert answer.content == b"<html></html>"


async def test_nobody_taps_buttons_in_someone_elses_private_chat() -> None:
    standin = make_standin()
    keyboard = {"inline_keyboard": [[{"text": "✅ Approve", "callback_data": "ap:tok:y"}]]}
    sent = await standin.call_method(
        "sendMessage",
        {"chat_id": REQUESTER.user_id, "text": "Approval needed", "reply_markup": keyboard},
    )
    async with (
        HttpServer(build_sandbox_app(standin)) as server,
        httpx.AsyncClient(base_url=server.url) as page,
    ):
        answer = await page.post(
            "/sandbox/tap",
            json={
                "chat_id": REQUESTER.user_id,
                "message_id": sent["message_id"],
                "user_id": APPROVER.user_id,
                "data": "ap:tok:y",
            },
        )
        assert answer.status_code == 400, answer.text


def test_a_failed_scripted_flow_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import agent.frontends.sandbox
    from agent.frontends.cli import main

    # An empty workspace: no runbooks, so no approval request ever comes. A short timeout.
    monkeypatch.setattr(
        agent.frontends.sandbox,
        "play_incident",
        functools.partial(agent.frontends.sandbox.play_incident, timeout=2),
    )
    for name in [k for k in os.environ if k.startswith(("TELEGRAM_", "LOOM_OPS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "sandbox",
            "--script",
            "incident",
            "--mock-llm",
            "--port",
            "0",
            "--db",
            str(tmp_path / "db.sqlite"),
            "--workspace",
            str(tmp_path),
        ]
    )
    out, err = capsys.readouterr()
    assert code != 0
    assert "cannot serve the sandbox" not in err, err
    assert "/run incident: API latency spike" in out  # the transcript, to see what went wrong


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver",
)
async def test_a_message_sent_while_the_page_connects_is_shown() -> None:
    import asyncio

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # A slow SSE connect (a loaded machine, a proxy), made deterministic: 1.5 s.
        driver.execute_cdp_cmd(
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
            await asyncio.to_thread(driver.get, server.url)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not await asyncio.to_thread(
                driver.find_elements, By.CSS_SELECTOR, "#person option"
            ):
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
            standin.inject_message(INCIDENT_CHAT, APPROVER.user_id, "sent while connecting")
            deadline = loop.time() + 4
            while True:
                texts = [
                    m.text
                    for m in await asyncio.to_thread(
                        driver.find_elements, By.CSS_SELECTOR, "#messages .msg"
                    )
                ]
                if any("sent while connecting" in t for t in texts):
                    break
                assert loop.time() < deadline, "the message never showed"
                await asyncio.sleep(0.1)
    finally:
        driver.quit()
