"""The bot process killed with SIGKILL at the worst moments, then restarted: every flow
completes, old buttons still work, and nothing recorded as sent is sent again."""

from __future__ import annotations

import re
import signal
import sqlite3
from pathlib import Path

import pytest

from agent.settings import Settings
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    BotProcess,
    approval_messages,
    bot_env,
    confirm_run,
    from_bot,
    keyboard_data,
    run_id_of,
    standin_server,
    summaries,
    undelivered,
    wait_for,
    wait_for_approval,
)


def _run_status(db: str, run_id: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


def _progress_messages(standin, run_id: str) -> list[dict]:
    """The run's progress messages: first line `<icon> Run <id> · <status>`."""
    head = re.compile(rf"^\S+ Run {re.escape(run_id)} · ")
    return [m for m in from_bot(standin, INCIDENTS) if head.match(m["text"])]


async def test_killed_while_a_run_waits_for_approval(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL while the run waits; after the restart the old button still approves, the run
    finishes, and no message is sent twice."""
    async with standin_server() as (standin, server):
        bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
        bot.start()
        try:
            await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike", timeout=30)
            request = await wait_for_approval(standin, INCIDENTS)
            run_id = run_id_of(request)
            await wait_for(standin, lambda: undelivered(settings.db) == 0)
            bot.kill()

            approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
            standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)  # while down
            bot.start()
            await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 30)
            await wait_for(standin, lambda: undelivered(settings.db) == 0, 10)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
        assert _run_status(settings.db, run_id) == "succeeded"
        assert len(approval_messages(standin, INCIDENTS)) == 1
        assert len(summaries(standin, INCIDENTS, run_id)) == 1
        assert len(_progress_messages(standin, run_id)) == 1
        edited = next(
            m for m in standin.messages(INCIDENTS) if m["message_id"] == request["message_id"]
        )
        assert "Approved by @bob" in edited["text"] and not keyboard_data(edited)


@pytest.mark.parametrize("kind", ["approval_request", "run_finished"])
async def test_killed_just_before_a_message_goes_out(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    """The run's state change is committed with its message; the bot dies before sending it.
    After the restart the message goes out, once."""
    async with standin_server() as (standin, server):
        env = bot_env(server, settings, LOOM_OPS_FAILPOINT=f"before_send_{kind}:1")
        bot = BotProcess(env, settings.workspace, tmp_path / "bot.log")
        bot.start()
        try:
            await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike", timeout=30)
            if kind == "run_finished":
                request = await wait_for_approval(standin, INCIDENTS)
                approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
                standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
            assert await bot.wait_killed() == -signal.SIGKILL, bot.output()
            bot_env_restart = bot_env(server, settings)
            bot = BotProcess(bot_env_restart, settings.workspace, tmp_path / "bot.log")
            bot.start()
            if kind == "approval_request":
                request = await wait_for_approval(standin, INCIDENTS)
                approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
                standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
            run_id = run_id_of(request)
            await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 30)
            await wait_for(standin, lambda: undelivered(settings.db) == 0, 10)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
        assert _run_status(settings.db, run_id) == "succeeded"
        assert len(approval_messages(standin, INCIDENTS)) == 1
        assert len(summaries(standin, INCIDENTS, run_id)) == 1
        assert len(_progress_messages(standin, run_id)) == 1


async def test_killed_after_the_summary_went_out_but_before_it_was_recorded(
    settings: Settings, tmp_path: Path
) -> None:
    """The one window no chat API can close: the Bot API took the summary, the bot died before
    recording it. Delivery is at least once, so it is sent again after the restart, once, and
    recorded; every message recorded before the crash is not repeated."""
    async with standin_server() as (standin, server):
        env = bot_env(server, settings, LOOM_OPS_FAILPOINT="after_send_run_finished:1")
        bot = BotProcess(env, settings.workspace, tmp_path / "bot.log")
        bot.start()
        try:
            await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike", timeout=30)
            request = await wait_for_approval(standin, INCIDENTS)
            run_id = run_id_of(request)
            approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
            standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
            assert await bot.wait_killed() == -signal.SIGKILL, bot.output()
            assert len(summaries(standin, INCIDENTS, run_id)) == 1
            bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
            bot.start()
            await wait_for(standin, lambda: undelivered(settings.db) == 0, 30)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
        assert len(summaries(standin, INCIDENTS, run_id)) == 2
        assert len(approval_messages(standin, INCIDENTS)) == 1
