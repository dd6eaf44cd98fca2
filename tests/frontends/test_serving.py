"""The long-running front ends as processes: `loom-ops telegram` (alias `bot`) checks its
settings before any network call and says in one line when the Bot API cannot be reached;
`loom-ops serve --telegram` runs the HTTP API and the bot in one process over one store."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from agent.frontends.serving import check_telegram
from agent.settings import SecretStr, Settings
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    TOKEN,
    BotProcess,
    approval_messages,
    bot_env,
    confirm_run,
    keyboard_data,
    run_id_of,
    standin_server,
    summaries,
    wait_for,
    wait_for_approval,
)


def _free_port() -> int:
    """A port nothing listens on (closed again at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_people_file_with_telegram_people_stands_in_for_approver_ids(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A team that names its people (with their Telegram ids) needs no TELEGRAM_APPROVER_IDS."""
    monkeypatch.setenv("TELEGRAM_ALLOWED_CHAT_IDS", str(INCIDENTS))
    monkeypatch.delenv("TELEGRAM_APPROVER_IDS", raising=False)
    monkeypatch.delenv("LOOM_OPS_TELEGRAM_APPROVER_IDS", raising=False)
    with_token = settings.model_copy(update={"telegram_bot_token": SecretStr(TOKEN)})
    assert check_telegram(with_token).settings.approver_ids == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"TELEGRAM_BOT_TOKEN": ""}, "TELEGRAM_BOT_TOKEN is not set"),
        # Nothing set yet: the token first, what @BotFather hands a new bot.
        (
            dict.fromkeys(
                ["TELEGRAM_BOT_TOKEN", "TELEGRAM_ALLOWED_CHAT_IDS", "TELEGRAM_APPROVER_IDS"], ""
            ),
            "TELEGRAM_BOT_TOKEN is not set",
        ),
        ({"TELEGRAM_BOT_TOKEN": "not-a-token"}, "TELEGRAM_BOT_TOKEN is malformed"),
        ({"TELEGRAM_ALLOWED_CHAT_IDS": ""}, "TELEGRAM_ALLOWED_CHAT_IDS is not set"),
        ({"TELEGRAM_ALLOWED_CHAT_IDS": "-100,general"}, "'general' is not a numeric Telegram id"),
        (
            {"TELEGRAM_APPROVER_IDS": "", "LOOM_OPS_PEOPLE_FILE": "/dev/null"},
            "nobody may decide in chat: set TELEGRAM_APPROVER_IDS",
        ),
        ({"TELEGRAM_API_BASE_URL": "api.telegram.org"}, "is not an http(s) URL"),
        # Without /bot the token would be appended to the port (and shown in the error).
        ({"TELEGRAM_API_BASE_URL": "http://127.0.0.1:8081"}, "must end with /bot"),
        ({"TELEGRAM_PROGRESS_INTERVAL": "-1"}, "TELEGRAM_PROGRESS_INTERVAL"),
    ],
)
async def test_bad_settings_are_one_line_and_exit_2_before_any_network_call(
    settings: Settings, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    """Each missing or malformed setting: exit 2, one line naming it, and the Bot API (the
    stand-in here) never hears from the bot."""
    async with standin_server() as (standin, server):
        env = bot_env(server, settings) | change
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent.frontends.cli", "telegram"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
        assert TOKEN.split(":")[1] not in done.stderr + done.stdout
        assert standin.calls() == []


def test_a_bad_bot_setting_is_refused_before_python_telegram_bot_loads(tmp_path: Path) -> None:
    """The settings are checked with the bot's own settings module only: a misconfigured
    `loom-ops telegram` answers before it loads python-telegram-bot (most of its start-up)."""
    probe = (
        "import sys\n"
        "from agent.errors import ServingRefused\n"
        "from agent.frontends.serving import check_telegram\n"
        "from agent.settings import Settings\n"
        "try:\n"
        "    check_telegram(Settings(_env_file=None))\n"
        "except ServingRefused as exc:\n"
        "    print(exc)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('telegram', 'bot')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_OPS_", "TELEGRAM_"))}
    env["TELEGRAM_BOT_TOKEN"] = TOKEN
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    refusal, loaded = done.stdout.splitlines()
    assert "TELEGRAM_ALLOWED_CHAT_IDS is not set" in refusal
    assert loaded == "['bot', 'bot.settings']"


async def test_the_bot_alias_serves_and_stops_cleanly_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    """`loom-ops bot` is the same command: it registers its commands, polls, and exits 0 on
    SIGTERM."""
    async with standin_server() as (standin, server):
        bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
        bot.command = "bot"
        bot.start()
        try:
            await standin.wait_until(lambda: bool(standin.calls("getUpdates")), 30)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
        assert [c["command"] for c in standin.commands()][:2] == ["run", "runs"]


async def test_a_failing_command_menu_is_a_warning_and_the_bot_serves(
    settings: Settings, tmp_path: Path
) -> None:
    """setMyCommands only sets the chat's command menu: when the Bot API answers it with a
    500, the bot logs a warning naming it and goes on polling."""
    async with standin_server() as (standin, server):
        standin.fail_next("setMyCommands", 500, None, "Internal Server Error")
        bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
        bot.start()
        try:
            await standin.wait_until(lambda: bool(standin.calls("getUpdates")), 30)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
        [warning] = [line for line in bot.output().splitlines() if "setMyCommands" in line]
        assert "WARNING" in warning and "Internal Server Error" in warning


class _NotABotApi(http.server.BaseHTTPRequestHandler):
    """Answers every Bot API call with 200 and JSON that is no Bot API answer (a wrong URL
    behind a proxy that still answers)."""

    def do_POST(self) -> None:
        body = json.dumps({"ok": True, "result": "surprise"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


def test_a_bot_api_that_answers_nonsense_at_start_up_is_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    """getMe answered with something python-telegram-bot cannot read: one line naming the
    Bot API and a non-zero exit, never a traceback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotABotApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/bot"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "LOOM_OPS_"))}
        env.update(
            TELEGRAM_BOT_TOKEN=TOKEN,
            TELEGRAM_ALLOWED_CHAT_IDS=str(INCIDENTS),
            TELEGRAM_APPROVER_IDS=str(BOB),
            TELEGRAM_API_BASE_URL=url,
            LOOM_OPS_DB=settings.db,
            LOOM_OPS_WORKSPACE=str(settings.workspace),
            LOOM_OPS_MOCK_LLM="1",
        )
        done = subprocess.run(
            [sys.executable, "-m", "agent.frontends.cli", "telegram"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    [line] = done.stderr.strip().splitlines()
    assert url in line and "getMe" in line, line


def test_telegram_with_an_unreachable_bot_api_says_so_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    """`loom-ops telegram` whose TELEGRAM_API_BASE_URL points at a closed port: one clear line
    and a non-zero exit, never a traceback."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "LOOM_OPS_"))}
    env.update(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_ALLOWED_CHAT_IDS=str(INCIDENTS),
        TELEGRAM_APPROVER_IDS=str(BOB),
        TELEGRAM_API_BASE_URL=f"http://127.0.0.1:{port}/bot",
        LOOM_OPS_DB=settings.db,
        LOOM_OPS_WORKSPACE=str(settings.workspace),
        LOOM_OPS_MOCK_LLM="1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent.frontends.cli", "telegram"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-600:]


async def test_a_chat_run_is_approved_through_the_http_api(
    settings: Settings, tmp_path: Path
) -> None:
    """/run in the chat, approve through POST /runs/{id}/approve: the chat's buttons go, its
    summary arrives, and the API shows the run succeeded; SIGTERM ends both cleanly."""
    port = _free_port()
    async with standin_server() as (standin, server):
        env = bot_env(server, settings, LOOM_OPS_API_USER="cli:oncall")
        process = BotProcess(env, settings.workspace, tmp_path / "serve.log")
        process.command = "serve"
        process.extra_args = ["--telegram", "--port", str(port)]
        process.start()
        try:
            await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike", timeout=20)
            request = await wait_for_approval(standin, INCIDENTS)
            run_id = run_id_of(request)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
                answer = await api.post(f"/runs/{run_id}/approve", json={"note": "via API"})
                assert answer.status_code == 200, answer.text
                await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
                run = (await api.get(f"/runs/{run_id}")).json()
            assert run["status"] == "succeeded"

            def edited() -> dict:
                [message] = approval_messages(standin, INCIDENTS)
                return message

            await wait_for(standin, lambda: not keyboard_data(edited()))
            assert "Approved by cli:oncall" in edited()["text"]
            assert "via API" in edited()["text"]
        finally:
            code = process.stop()
        assert code == 0, process.output()
