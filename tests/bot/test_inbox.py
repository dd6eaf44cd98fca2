"""No lost updates: `loom-ops telegram` as a real process, SIGKILLed right after Telegram (the
stand-in) took its confirmation of a batch, again and again; every `/run` still becomes exactly
one run, and each is answered. In webhook mode the 200 comes only after the update is stored."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from agent.settings import Settings
from bot.standin import BotApiStandIn, StandInServer
from bot.starts import start_run_id
from tests.bot_harness import (
    ALICE,
    INCIDENTS,
    BotProcess,
    bot_env,
    from_bot,
    long_notes_runbook,
    make_standin,
    running_bot,
    standin_server,
    telegram_settings,
    wait_for,
)
from tests.support import raw_rows

SECRET = "inbox-secret_token"
RUNS_PER_ROUND = 3
# The issue lost `/run` messages killing the bot 0-30 ms after a confirmation.
MAX_KILL_DELAY = 0.030


def _env(server: Any, settings: Settings, **extra: str) -> dict[str, str]:
    """A bot that records runs and drives none (--no-worker keeps the machine quiet), with no
    /run rate or active-run cap in the way of the flood this test sends."""
    return bot_env(
        server, settings, TELEGRAM_RUN_RATE="0", LOOM_OPS_MAX_ACTIVE_RUNS="10000", **extra
    )


def _drill(settings: Settings) -> None:
    (settings.workspace / "runbooks" / "inbox-drill.yaml").write_text(
        long_notes_runbook(1, "inbox-drill", "inbox drill")
    )


def _expected_run_id(message: dict[str, Any]) -> str:
    """The run a `/run <runbook id>` message starts (its id derives from the message)."""
    return start_run_id(message["chat"]["id"], message["message_id"], message["date"], 0)


def _answered(standin: BotApiStandIn, run_ids: list[str]) -> list[str]:
    """The runs no bot message in the chat names yet."""
    texts = [m.get("text", "") for m in from_bot(standin, INCIDENTS)]
    return [run_id for run_id in run_ids if not any(run_id in text for text in texts)]


def _root_runs(db: str) -> list[str]:
    return [row[0] for row in raw_rows(db, "SELECT id FROM runs WHERE parent_id IS NULL")]


async def _kill_right_after_confirmations(settings: Settings, log: Path, kills: int) -> None:
    """Start the bot, send RUNS_PER_ROUND `/run`s, SIGKILL it 0-30 ms after the stand-in
    takes a confirmation, `kills` times; then start it once more and count."""
    _drill(settings)
    chance = random.Random(17)
    async with standin_server() as (standin, server):
        bot = BotProcess(_env(server, settings), settings.workspace, log)
        bot.extra_args = ["--no-worker"]
        armed = False
        loop = asyncio.get_running_loop()

        def kill() -> None:
            if bot.proc is not None and bot.proc.poll() is None:
                bot.proc.send_signal(signal.SIGKILL)

        def confirmed(offset: int) -> None:
            nonlocal armed
            if armed:
                armed = False
                delay = chance.choice([0.0, chance.uniform(0, MAX_KILL_DELAY)])
                if delay == 0:
                    kill()  # before the stand-in even answers the confirming request
                else:
                    loop.call_later(delay, kill)

        standin.on_confirm = confirmed
        sent: list[dict[str, Any]] = []
        try:
            for round_ in range(kills):
                bot.start()
                for n in range(RUNS_PER_ROUND):
                    text = f"/run inbox-drill round {round_} message {n}"
                    sent.append(standin.inject_message(INCIDENTS, ALICE, text))
                armed = True
                assert await bot.wait_killed() == -signal.SIGKILL, bot.output()
            standin.on_confirm = None
            bot.start()
            expected = [_expected_run_id(message) for message in sent]
            await wait_for(standin, lambda: not _answered(standin, expected), timeout=60)
        finally:
            if bot.proc is not None and bot.proc.poll() is None:
                assert bot.stop() == 0, bot.output()
    runs = _root_runs(settings.db)
    assert len(runs) == len(sent) == kills * RUNS_PER_ROUND, bot.output()
    assert sorted(runs) == sorted(expected)  # one run per /run: none lost, none twice
    requests = raw_rows(settings.db, "SELECT request FROM runs WHERE parent_id IS NULL")
    assert sorted(r[0] for r in requests) == sorted(m["text"][len("/run ") :] for m in sent)
    pending = raw_rows(settings.db, "SELECT COUNT(*) FROM telegram_inbox WHERE handled_at IS NULL")
    assert pending == [(0,)]


async def test_every_run_message_becomes_one_run_across_kills_after_confirmation(
    settings: Settings, db_url: str, tmp_path: Path
) -> None:
    """10 SIGKILLs, each 0-30 ms after Telegram took the bot's confirmation of a batch of
    `/run` messages: every one of them is one run after the restarts, and each is answered;
    on both engines."""
    settings = settings.model_copy(update={"db": db_url})
    await _kill_right_after_confirmations(settings, tmp_path / "bot.log", kills=10)


@pytest.mark.slow
async def test_every_run_message_becomes_one_run_across_many_kills_after_confirmation(
    settings: Settings, tmp_path: Path
) -> None:
    """The soak: 60 SIGKILLs right after a confirmation, 180 `/run` messages, 180 runs."""
    await _kill_right_after_confirmations(settings, tmp_path / "bot.log", kills=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_webhook_update_answered_200_is_handled_after_a_kill(
    settings: Settings, tmp_path: Path
) -> None:
    """Webhook mode: the bot is SIGKILLed the moment Telegram has its 200 for a `/run`, three
    times; each of those updates is handled after the restart (it was stored before the 200),
    once."""
    _drill(settings)
    port = _free_port()
    async with standin_server() as (standin, server):
        env = _env(
            server,
            settings,
            TELEGRAM_WEBHOOK_SECRET=SECRET,
            TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{port}/telegram",
            TELEGRAM_WEBHOOK_LISTEN=f"127.0.0.1:{port}",
        )
        bot = BotProcess(env, settings.workspace, tmp_path / "bot.log")
        bot.extra_args = ["--no-worker"]
        armed = False

        def confirmed(offset: int) -> None:
            nonlocal armed
            if armed and bot.proc is not None and bot.proc.poll() is None:
                armed = False
                bot.proc.send_signal(signal.SIGKILL)  # the 200 has just arrived

        standin.on_confirm = confirmed
        sent: list[dict[str, Any]] = []
        try:
            for round_ in range(3):
                bot.start()
                armed = True
                sent.append(standin.inject_message(INCIDENTS, ALICE, f"/run inbox-drill {round_}"))
                assert await bot.wait_killed() == -signal.SIGKILL, bot.output()
                assert standin.webhook_deliveries[-1] == (round_ + 1, 200)
            standin.on_confirm = None
            bot.start()
            expected = [_expected_run_id(message) for message in sent]
            await wait_for(standin, lambda: not _answered(standin, expected), timeout=60)
        finally:
            if bot.proc is not None and bot.proc.poll() is None:
                assert bot.stop() == 0, bot.output()
    assert sorted(_root_runs(settings.db)) == sorted(expected), bot.output()
    delivered = [update_id for update_id, status in standin.webhook_deliveries if status == 200]
    assert delivered == [1, 2, 3]  # each taken once: none was delivered again


async def _until_handled(db: str, count: int) -> None:
    deadline = time.monotonic() + 15
    while raw_rows(db, "SELECT COUNT(*) FROM telegram_inbox WHERE handled_at IS NOT NULL") != [
        (count,)
    ]:
        assert time.monotonic() < deadline, raw_rows(db, "SELECT * FROM telegram_inbox")
        await asyncio.sleep(0.05)


async def test_a_run_message_handled_again_after_a_crash_starts_no_second_run(
    settings: Settings,
) -> None:
    """The bot died after a `/run`'s handler started its run and before the update was
    marked handled: the restarted bot handles the update again, finds the run the message
    started (its id derives from the message), and starts nothing, says nothing new."""
    _drill(settings)
    standin = make_standin()
    async with StandInServer(standin) as server:
        async with running_bot(settings, telegram_settings(server)):
            asked = standin.inject_message(INCIDENTS, ALICE, "/run inbox-drill just once")
            await wait_for(standin, lambda: from_bot(standin, INCIDENTS))  # the run's answer
            await _until_handled(settings.db, 1)
            started = _root_runs(settings.db)
        raw_rows(settings.db, "UPDATE telegram_inbox SET handled_at = NULL")  # the crash
        async with running_bot(settings, telegram_settings(server)):
            await _until_handled(settings.db, 1)  # handled again
            sent = standin.inject_message(INCIDENTS, ALICE, "/help")
            after = sent["message_id"]
            await wait_for(
                standin, lambda: any(m["message_id"] > after for m in from_bot(standin, INCIDENTS))
            )
    assert _root_runs(settings.db) == started == [_expected_run_id(asked)]
    texts = [m.get("text", "") for m in from_bot(standin, INCIDENTS)]
    assert not [t for t in texts if "Cannot start" in t], texts
