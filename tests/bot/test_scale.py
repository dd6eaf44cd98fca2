"""The bot beyond one process: on PostgreSQL exactly one `loom-ops telegram` polls (the leader
of an advisory lock) and a standby takes over when it is SIGKILLed, with no update handled
twice; in webhook mode only requests with the secret token get in."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.settings import Settings
from tests.bot_harness import (
    ALICE,
    INCIDENTS,
    BotProcess,
    bot_env,
    from_bot,
    standin_server,
    wait_for,
)
from tests.conftest import postgres_schema
from tests.support import raw_rows

SECRET = "s3cret_token-for-tests"
STARTED = re.compile(r"\brun (tg-[0-9a-f]+)\b", re.IGNORECASE)


@pytest.fixture
def pg_settings(workspace: Path) -> Iterator[Settings]:
    """Settings over a fresh PostgreSQL schema (skipped without a test server)."""
    with postgres_schema() as url:
        yield Settings(_env_file=None, db=url, workspace=workspace, mock_llm=True, user="tester")


def _started_runs(standin: object) -> list[str]:
    """Run ids the bot announced in the incident chat, each once. (A message the killed
    leader sent but had not recorded is sent again by the standby: chat delivery is at least
    once. Runs are counted in the store.)"""
    found: list[str] = []
    for message in from_bot(standin, INCIDENTS):  # type: ignore[arg-type]
        match = STARTED.search(message.get("text", ""))
        if match and "Started" in message.get("text", "") and match.group(1) not in found:
            found.append(match.group(1))
    return found


async def _wait_for_log(bot: BotProcess, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in bot.output():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged in {timeout} s; log:\n{bot.output()}")
        if bot.proc is not None and bot.proc.poll() is not None:
            raise AssertionError(f"the bot exited ({bot.proc.returncode}):\n{bot.output()}")
        await asyncio.sleep(0.1)


async def test_a_standby_takes_over_polling_and_no_update_is_handled_twice(
    pg_settings: Settings, tmp_path: Path
) -> None:
    """Two bots share the store: one polls, one stands by. The leader handles a batch whose
    confirmation never reaches Telegram, then dies by SIGKILL; the standby starts polling
    within seconds, gets the same batch again, and skips every update already taken."""
    async with standin_server() as (standin, server):
        env = bot_env(server, pg_settings)
        leader = BotProcess(env, pg_settings.workspace, tmp_path / "leader.log")
        standby = BotProcess(env, pg_settings.workspace, tmp_path / "standby.log")
        leader.extra_args = standby.extra_args = ["--no-worker"]
        try:
            leader.start()
            await _wait_for_log(leader, "leading: polling")
            standby.start()
            await _wait_for_log(standby, "serving chats")
            await asyncio.sleep(2)  # several lock attempts: the standby must not poll
            assert "leading: polling" not in standby.output()

            standin.hold_confirmations = True  # the leader's offsets never arrive
            for n in range(5):
                standin.inject_message(INCIDENTS, ALICE, f"/run api-latency-spike incident {n}")
            await wait_for(standin, lambda: len(_started_runs(standin)) == 5, timeout=20)
            leader.kill()
            killed_at = time.monotonic()

            await _wait_for_log(standby, "leading: polling", timeout=15)
            took_over = time.monotonic() - killed_at
            standin.hold_confirmations = False
            for n in range(5, 8):
                standin.inject_message(INCIDENTS, ALICE, f"/run api-latency-spike incident {n}")
            await wait_for(standin, lambda: len(_started_runs(standin)) == 8, timeout=20)
            await asyncio.sleep(1.5)  # room for a duplicate to show up, if there were one
        finally:
            for bot in (leader, standby):
                if bot.proc is not None and bot.proc.poll() is None:
                    bot.stop()

    runs = _started_runs(standin)
    assert len(runs) == 8, runs
    stored = raw_rows(pg_settings.db, "SELECT id, status FROM runs WHERE parent_id IS NULL")
    assert sorted(row[0] for row in stored) == sorted(runs)  # one run per /run, no more
    # --no-worker: the bots recorded the runs and drove none of them (no worker is running).
    assert {row[1] for row in stored} == {"queued"}
    taken = raw_rows(pg_settings.db, "SELECT COUNT(*) FROM telegram_inbox")
    assert taken == [(8,)]
    # The standby really saw the leader's batch again, and skipped it.
    assert standby.output().count("was taken already; skipping it") >= 5, standby.output()
    print(f"standby polled {took_over:.1f} s after the leader's SIGKILL")


def _webhook_env(server: object, settings: Settings, port: int) -> dict[str, str]:
    return bot_env(
        server,  # type: ignore[arg-type]
        settings,
        TELEGRAM_WEBHOOK_SECRET=SECRET,
        TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{port}/telegram",
        TELEGRAM_WEBHOOK_LISTEN=f"127.0.0.1:{port}",
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_webhook_takes_updates_with_the_secret_and_refuses_the_rest(
    settings: Settings, tmp_path: Path
) -> None:
    """Webhook mode: Telegram (the stand-in) POSTs updates with the secret token and they are
    handled; a request with a wrong or missing token is refused with 403 and never handled."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/telegram"
    async with standin_server() as (standin, server):
        bot = BotProcess(_webhook_env(server, settings, port), settings.workspace, tmp_path / "b")
        try:
            bot.start()
            await _wait_for_log(bot, "taking updates by webhook")
            assert standin.webhook_url == url

            standin.inject_message(INCIDENTS, ALICE, "/run api-latency-spike")
            await wait_for(standin, lambda: len(_started_runs(standin)) == 1, timeout=20)
            assert any(status == 200 for _, status in standin.webhook_deliveries)

            forged = {
                "update_id": 990001,
                "message": {
                    "message_id": 9001,
                    "date": int(time.time()),
                    "chat": {"id": INCIDENTS, "type": "supergroup", "title": "Incidents"},
                    "from": {"id": ALICE, "is_bot": False, "first_name": "Alice"},
                    "text": "/run incident: forged",
                    "entities": [{"type": "bot_command", "offset": 0, "length": 4}],
                },
            }
            async with httpx.AsyncClient(timeout=5) as client:
                wrong = await client.post(
                    url, json=forged, headers={"X-Telegram-Bot-Api-Secret-Token": "guess"}
                )
                missing = await client.post(url, json=forged)
                garbage = await client.post(
                    url, content=b"{not json", headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}
                )
                health = await client.get(f"http://127.0.0.1:{port}/healthz")
            await asyncio.sleep(1)  # a forged update handled anyway would show by now
        finally:
            if bot.proc is not None and bot.proc.poll() is None:
                assert bot.stop() == 0, bot.output()

    assert wrong.status_code == 403 and "secret" in wrong.json()["error"]
    assert missing.status_code == 403
    assert garbage.status_code == 400 and garbage.json()["error"] == "not a Telegram update"
    assert health.status_code == 200
    assert len(_started_runs(standin)) == 1
    assert raw_rows(settings.db, "SELECT COUNT(*) FROM runs WHERE parent_id IS NULL") == [(1,)]
    assert raw_rows(
        settings.db, "SELECT COUNT(*) FROM telegram_inbox WHERE update_id = 990001"
    ) == [(0,)]


async def test_webhook_mode_without_a_secret_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    """No TELEGRAM_WEBHOOK_SECRET: one line, exit 2, and no call reaches the Bot API."""
    async with standin_server() as (standin, server):
        env = _webhook_env(server, settings, _free_port())
        del env["TELEGRAM_WEBHOOK_SECRET"]
        bot = BotProcess(env, settings.workspace, tmp_path / "nosecret.log")
        bot.start()
        code = await bot.wait_killed(20)
    assert code == 2
    lines = bot.output().strip().splitlines()
    assert len(lines) == 1 and "TELEGRAM_WEBHOOK_SECRET" in lines[0], lines
    assert standin.calls() == []


async def test_two_instances_share_the_outbox_and_send_each_message_once(
    pg_settings: Settings,
) -> None:
    """Two bot instances' senders over one PostgreSQL store, each with its own connections:
    every chat message goes out exactly once, in order per chat, whoever sent it."""
    from telegram import Bot

    from agent.records import Origin
    from agent.service.runs import RunService
    from bot.outbox import OutboxSender
    from bot.store import ChatStore
    from tests.bot_harness import PLATFORM, TOKEN

    chats = {INCIDENTS: [], PLATFORM: []}  # type: dict[int, list[str]]
    recorder = await RunService.open(pg_settings, executes_runs=False)
    try:
        for n in range(16):
            chat = INCIDENTS if n % 2 else PLATFORM
            run_id = f"shared-{n:02d}"
            await recorder.start(
                run_id, f"incident: API latency {n}", origin=Origin("telegram", chat)
            )
            chats[chat].append(run_id)
    finally:
        await recorder.close()

    async with standin_server() as (standin, server):
        instances = [await RunService.open(pg_settings, executes_runs=False) for _ in range(2)]
        bots = [Bot(TOKEN, base_url=server.bot_base_url) for _ in instances]
        senders = [
            OutboxSender(
                service,
                ChatStore(service.database),
                bot,
                progress_interval=0.1,
                poll_interval=0.2,
            )
            for service, bot in zip(instances, bots, strict=True)
        ]
        tasks = [asyncio.create_task(sender.run()) for sender in senders]
        try:

            def sent() -> int:
                return sum(len(from_bot(standin, chat)) for chat in chats)

            await wait_for(standin, lambda: sent() >= 16, timeout=20)
            await asyncio.sleep(1.0)  # room for a second copy, if there were one
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for service in instances:
                await service.close()

    for chat, run_ids in chats.items():
        texts = [m.get("text", "") for m in from_bot(standin, chat)]
        announced = [run_id for text in texts for run_id in run_ids if run_id in text]
        assert announced == run_ids, (chat, texts)  # each once, in the order queued
    pending = raw_rows(
        pg_settings.db,
        "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL",
    )
    assert pending == [(0,)]
