"""`loom-ops telegram` / `loom-ops bot` as a process: settings checked before any network call."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from agent.settings import Settings
from tests.bot_harness import BotProcess, bot_env, standin_server


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"TELEGRAM_BOT_TOKEN": ""}, "TELEGRAM_BOT_TOKEN is not set"),
        ({"TELEGRAM_BOT_TOKEN": "not-a-token"}, "TELEGRAM_BOT_TOKEN is malformed"),
        ({"TELEGRAM_ALLOWED_CHAT_IDS": ""}, "TELEGRAM_ALLOWED_CHAT_IDS is not set"),
        ({"TELEGRAM_ALLOWED_CHAT_IDS": "-100,general"}, "'general' is not a numeric Telegram id"),
        ({"TELEGRAM_APPROVER_IDS": ""}, "TELEGRAM_APPROVER_IDS is not set"),
        ({"TELEGRAM_API_BASE_URL": "api.telegram.org"}, "is not an http(s) URL"),
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
        assert standin.calls() == []


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
