"""`loom-ops sandbox`: the scripted incident flow (and a failed one) through the page-facing
API, and the page's API refusing bad input, cross-site requests and taps in someone else's
chat. The page in a real browser is in test_sandbox_browser.py."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.frontends.sandbox import (
    APPROVER,
    EXAMPLE_PEOPLE,
    INCIDENT_CHAT,
    REQUESTER,
    build_sandbox_app,
    make_standin,
    running_sandbox,
    service_settings,
    telegram_settings,
)
from agent.http_server import HttpServer
from agent.settings import Settings
from bot.settings import TelegramSettings
from bot.standin import UploadedFile


def test_the_scripted_incident_plays_to_a_summary(settings: Settings, tmp_path: Path) -> None:
    """What CI checks of the README's claim: /run by the requester, Approve by the approver,
    the audit summary; exit 0, the transcript printed, no Telegram token anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "LOOM_OPS_"))}
    env["TELEGRAM_BOT_TOKEN"] = "123:this-real-setting-must-be-ignored-by-the-sandbox"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.frontends.cli",
            "sandbox",
            "--script",
            "incident",
            "--mock-llm",
            "--port",
            "0",
            "--db",
            settings.db,
            "--workspace",
            str(settings.workspace),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "/run incident: API latency spike" in out
    assert "✅ Approved by @sam at" in out
    assert ": SUCCEEDED" in out and "approved by @sam (telegram:100000001)" in out
    assert out.rstrip().endswith("sandbox: the incident flow succeeded")


async def test_the_page_api_answers_bad_input_with_4xx() -> None:
    """The page's own API: bad taps and messages are 400 JSON, never a 500; the page, its
    assets and the state (a sandbox, with a requester and an approver) are served."""
    standin = make_standin()
    async with (
        HttpServer(build_sandbox_app(standin)) as server,
        httpx.AsyncClient(base_url=server.url) as page,
    ):
        html = (await page.get("/")).text
        assert "sandbox" in html and '<script src="/sandbox/static/app.js">' in html
        assert "http://" not in html and "https://" not in html  # no CDN, works offline
        assert (await page.get("/sandbox/static/app.js")).status_code == 200
        assert (await page.get("/sandbox/static/secrets.txt")).status_code == 404
        state = (await page.get("/sandbox/state")).json()
        assert state["sandbox"] is True
        roles = {p["user_id"]: p["role"] for p in state["people"]}
        assert (
            "not an approver" in roles[REQUESTER.user_id] and roles[APPROVER.user_id] == "approver"
        )
        assert INCIDENT_CHAT in [c["id"] for c in state["chats"]]
        for path, body in (
            ("/sandbox/say", {"chat_id": INCIDENT_CHAT, "user_id": REQUESTER.user_id}),
            ("/sandbox/say", {"chat_id": INCIDENT_CHAT, "user_id": 1, "text": ""}),
            (
                "/sandbox/tap",
                {"chat_id": INCIDENT_CHAT, "message_id": 99, "user_id": 1, "data": "x"},
            ),
            ("/sandbox/tap", ["not", "an", "object"]),
        ):
            answer = await page.post(path, json=body)
            assert answer.status_code == 400 and "error" in answer.json(), (path, answer.text)
        broken = await page.post(
            "/sandbox/say", content=b"{", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 400
        assert (await page.get("/sandbox/documents/nope")).status_code == 404


async def test_a_trace_the_bot_sends_is_downloadable_from_the_page(settings: Settings) -> None:
    """/trace in the sandbox: the bot sends the HTML trace as a document, and the page's
    download link serves its bytes as an attachment."""
    async with running_sandbox(settings, port=0) as sandbox:
        standin, service = sandbox.standin, sandbox.service
        async with httpx.AsyncClient(base_url=sandbox.url) as page:
            say = {"chat_id": INCIDENT_CHAT, "user_id": REQUESTER.user_id}
            await page.post("/sandbox/say", json=say | {"text": "/run disk-almost-full"})
            await standin.wait_until(
                lambda: any(
                    "Approval needed" in m.get("text", "") for m in standin.messages(INCIDENT_CHAT)
                ),
                30,
            )
            [run] = [r for r in await service.store.list_runs() if r.parent_id is None]
            await page.post("/sandbox/say", json=say | {"text": f"/trace {run.id}"})
            await standin.wait_until(
                lambda: any(m.get("document") for m in standin.messages(INCIDENT_CHAT)), 30
            )
            [sent] = [m for m in standin.messages(INCIDENT_CHAT) if m.get("document")]
            document = sent["document"]
            answer = await page.get(
                f"/sandbox/documents/{document['file_id']}",
                params={"name": document["file_name"]},
            )
        assert answer.status_code == 200
        assert f'filename="{run.id}.html"' in answer.headers["content-disposition"]
        assert b"<html" in answer.content.lower() and run.id.encode() in answer.content


async def test_a_cross_site_form_post_cannot_drive_the_sandbox() -> None:
    """What a <form enctype="text/plain"> or a no-cors fetch on another site sends is a
    "simple" request (no CORS preflight): the page's API refuses it and nothing is said."""
    standin = make_standin()
    async with (
        HttpServer(build_sandbox_app(standin)) as server,
        httpx.AsyncClient(base_url=server.url) as evil,
    ):
        answer = await evil.post(
            "/sandbox/say",
            content=b'{"chat_id": %d, "user_id": %d, "text": "/run incident: x"}'
            % (INCIDENT_CHAT, REQUESTER.user_id),
            headers={"content-type": "text/plain", "origin": "http://evil.example"},
        )
        assert answer.status_code in (400, 403, 415), answer.text
        assert standin.messages(INCIDENT_CHAT) == []


async def test_infinity_as_an_id_is_a_400_not_a_500() -> None:
    """JSON's non-standard `Infinity` as a chat or message id is bad input, not a crash."""
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
    """A download asked for under a name outside Latin-1 (`報告.html`) is served, not a 500."""
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
    """The approver cannot tap the buttons of a message in the requester's private chat."""
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
    """`sandbox --script incident` in an empty workspace (no runbooks, so no approval request
    ever comes): a non-zero exit and the transcript, not a claim that it cannot serve."""
    import agent.frontends.sandbox
    from agent.frontends.cli import main

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


def test_the_sandbox_ignores_the_real_approver_settings(settings: Settings) -> None:
    """A LOOM_OPS_APPROVERS exported for the CLI would narrow who may decide and lock the
    sandbox's Sam out: the sandbox brings its own people."""
    real = settings.model_copy(
        update={"approvers": ["cli:root"], "telegram_approvers": ["999"], "people_file": None}
    )
    own = service_settings(real)
    assert own.approvers == [] and own.telegram_approvers == [str(APPROVER.user_id)]
    assert own.people_file == EXAMPLE_PEOPLE


def test_the_sandbox_ignores_the_teams_telegram_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """TELEGRAM_* exported for the real bot (a /run rate of one, a webhook) would refuse the
    second /run on the page or change how its bot listens: the sandbox sets every one."""
    monkeypatch.setenv("TELEGRAM_RUN_RATE", "1")
    monkeypatch.setenv("TELEGRAM_RUN_RATE_WINDOW", "86400")
    monkeypatch.setenv("TELEGRAM_WEBHOOK_URL", "https://bot.example.org/loom-ops")
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "team-secret-0123456789")
    own = telegram_settings("http://127.0.0.1:1/bot")
    plain = TelegramSettings(_env_file=None, allowed_chat_ids=[INCIDENT_CHAT])
    monkeypatch.delenv("TELEGRAM_RUN_RATE")
    monkeypatch.delenv("TELEGRAM_RUN_RATE_WINDOW")
    monkeypatch.delenv("TELEGRAM_WEBHOOK_URL")
    monkeypatch.delenv("TELEGRAM_WEBHOOK_SECRET")
    default = TelegramSettings(_env_file=None, allowed_chat_ids=[INCIDENT_CHAT])
    assert plain.run_rate == 1 and plain.webhook_url is not None  # the environment counts
    assert (own.run_rate, own.run_rate_window) == (default.run_rate, default.run_rate_window)
    assert own.webhook_url is None and own.webhook_secret is None
    assert own.api_base_url == "http://127.0.0.1:1/bot"
