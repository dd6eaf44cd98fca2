"""The bot's end-to-end test bench: the Bot API stand-in on 127.0.0.1, and the real
python-telegram-bot Application (in this process or as a `loom-ops telegram` subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.service.runs import RunService
from agent.settings import Settings
from bot.gateway import serve_bot
from bot.settings import TelegramSettings
from bot.standin import BotApiStandIn, StandInServer

TOKEN = "123456789:TEST-loom-ops-token-0123456789"
INCIDENTS = -100101  # the incident group
PLATFORM = -100202  # another team's group
PRIVATE = 100000001  # the approver's private chat with the bot
FOREIGN = -100999  # a chat the bot does not serve

ALICE = 100000050  # on call, starts runs, is not an approver
BOB = 100000001  # an approver (named in the shipped runbooks)
CAROL = 100000002  # another approver
MALLORY = 100000066  # in the incident chat, not an approver

JSON = dict[str, Any]


def make_standin(first_message_id: int = 1) -> BotApiStandIn:
    """A stand-in with the test's people and chats."""
    standin = BotApiStandIn(TOKEN, first_message_id=first_message_id)
    standin.add_user(ALICE, "Alice", "alice")
    standin.add_user(BOB, "Bob", "bob")
    standin.add_user(CAROL, "Carol", "carol")
    standin.add_user(MALLORY, "Mallory", "mallory")
    standin.add_chat(INCIDENTS, "supergroup", "Incidents")
    standin.add_chat(PLATFORM, "supergroup", "Platform")
    standin.add_chat(FOREIGN, "supergroup", "Elsewhere")
    standin.add_chat(PRIVATE, "private")
    return standin


def telegram_settings(server: StandInServer, **overrides: Any) -> TelegramSettings:
    """Bot settings pointing at the stand-in; flood limits (Telegram's, and the /run rate:
    tests/bot/test_limits.py turns it on) off so tests run at full speed."""
    values: dict[str, Any] = {
        "run_rate": 0,
        "allowed_chat_ids": [INCIDENTS, PLATFORM, PRIVATE],
        "approver_ids": [BOB, CAROL],
        "api_base_url": server.bot_base_url,
        "group_rate": 0,
        "overall_rate": 0,
        "progress_interval": 0.3,
        "poll_timeout": 1,
    }
    return TelegramSettings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


def bot_env(server: StandInServer, settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `loom-ops telegram` subprocess against the stand-in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "LOOM_OPS_"))}
    env.update(
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_ALLOWED_CHAT_IDS=f"{INCIDENTS},{PLATFORM},{PRIVATE}",
        TELEGRAM_APPROVER_IDS=f"{BOB},{CAROL}",
        TELEGRAM_API_BASE_URL=server.bot_base_url,
        TELEGRAM_GROUP_RATE="0",
        TELEGRAM_OVERALL_RATE="0",
        TELEGRAM_RUN_RATE="0",
        TELEGRAM_PROGRESS_INTERVAL="0.3",
        TELEGRAM_POLL_TIMEOUT="1",
        LOOM_OPS_DB=settings.db,
        LOOM_OPS_WORKSPACE=str(settings.workspace),
        LOOM_OPS_MOCK_LLM="1",
        LOOM_OPS_LEASE_TTL="2",
    )
    env.update(extra)
    return env


@asynccontextmanager
async def standin_server() -> AsyncIterator[tuple[BotApiStandIn, StandInServer]]:
    """The stand-in, served on a free 127.0.0.1 port."""
    standin = make_standin()
    async with StandInServer(standin) as server:
        yield standin, server


@asynccontextmanager
async def running_bot(settings: Settings, telegram: TelegramSettings) -> AsyncIterator[RunService]:
    """The real bot in this process until the block ends; yields its RunService."""
    service = await RunService.open(settings)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_bot(service, TOKEN, telegram, stop, ready))
    try:
        done, _ = await asyncio.wait(
            [task, asyncio.create_task(ready.wait())],
            timeout=15,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            task.result()  # raises what stopped the bot
        assert ready.is_set(), "the bot did not start"
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await service.close()


class BotProcess:
    """`loom-ops telegram` as a real subprocess, so a test can SIGKILL it."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self._env, self._cwd, self._log = env, cwd, log
        self.command = "telegram"  # or its alias "bot", or "serve"
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the bot (appending its output to the log file)."""
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.frontends.cli", self.command, *self.extra_args],
                env=self._env,
                cwd=self._cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_killed(self, timeout: float = 30) -> int:
        """Wait until the process is gone (e.g. killed at a failpoint); its return code."""
        assert self.proc is not None
        for _ in range(int(timeout * 20)):
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        raise TimeoutError(f"bot still running; log:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, the way a service manager stops it; its return code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def output(self) -> str:
        """Everything the bot logged."""
        return self._log.read_text(errors="replace")


# -- reading the chat --------------------------------------------------------------------------


def from_bot(standin: BotApiStandIn, chat_id: int) -> list[JSON]:
    """The bot's messages in a chat, in order."""
    return [m for m in standin.messages(chat_id) if m.get("from", {}).get("is_bot")]


def keyboard_data(message: JSON) -> list[str]:
    """Every callback_data of a message's inline keyboard."""
    markup = message.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


def approval_messages(standin: BotApiStandIn, chat_id: int) -> list[JSON]:
    """The bot's approval requests in a chat (with or without buttons by now)."""
    return [m for m in from_bot(standin, chat_id) if "Approval needed" in m.get("text", "")]


def summaries(standin: BotApiStandIn, chat_id: int, run_id: str | None = None) -> list[JSON]:
    """The bot's audit summaries in a chat (of one run)."""
    head = f"Run {run_id}:" if run_id else "Run "
    return [
        m
        for m in from_bot(standin, chat_id)
        if m.get("text", "").startswith(head) and "Requested:" in m.get("text", "")
    ]


async def wait_for(
    standin: BotApiStandIn, predicate: Callable[[], Any], timeout: float = 15.0
) -> None:
    """Wait until the predicate holds (re-checked on every stand-in change)."""
    await standin.wait_until(lambda: bool(predicate()), timeout)


async def wait_for_approval(standin: BotApiStandIn, chat_id: int, count: int = 1) -> JSON:
    """Wait for the `count`-th approval request with buttons in a chat; returns the last."""
    await wait_for(
        standin,
        lambda: len([m for m in approval_messages(standin, chat_id) if keyboard_data(m)]) >= count,
    )
    return [m for m in approval_messages(standin, chat_id) if keyboard_data(m)][-1]


def start_card(standin: BotApiStandIn, asked: JSON) -> JSON | None:
    """The bot's /run card answering the /run message `asked` (with its buttons), if any."""
    for message in from_bot(standin, asked["chat"]["id"]):
        replied = message.get("reply_to_message") or {}
        if replied.get("message_id") == asked["message_id"] and any(
            data.startswith("rs:") for data in keyboard_data(message)
        ):
            return message
    return None


async def confirm_run(
    standin: BotApiStandIn,
    chat_id: int,
    user_id: int,
    text: str,
    *,
    thread_id: int | None = None,
    choice: int = 0,
    timeout: float = 15.0,
) -> JSON:
    """`/run <free text>` as `user_id`, then a tap on the card's ▶ Start (the `choice`-th
    candidate) by the same person: what a person does to start a run; returns the card."""
    asked = standin.inject_message(chat_id, user_id, f"/run {text}", thread_id=thread_id)
    await wait_for(standin, lambda: start_card(standin, asked), timeout)
    card = start_card(standin, asked)
    assert card is not None
    starts = [d for d in keyboard_data(card) if d.startswith("rs:") and d != "rs:x"]
    standin.inject_callback(chat_id, card["message_id"], user_id, starts[choice])
    return card


def run_id_of(message: JSON) -> str:
    """The root run id an approval request or progress message names."""
    text = message["text"]
    marker = "Run: " if "Run: " in text else "Run "
    return text.split(marker, 1)[1].split()[0]


@asynccontextmanager
async def chat_bench(
    settings: Settings, **telegram: Any
) -> AsyncIterator[tuple[BotApiStandIn, RunService]]:
    """The stand-in and the real bot in this process, talking over 127.0.0.1."""
    standin = make_standin()
    async with (
        StandInServer(standin) as server,
        running_bot(settings, telegram_settings(server, **telegram)) as service,
    ):
        yield standin, service


def undelivered(db: str) -> int:
    """Outbox entries neither delivered nor given up on."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        ).fetchone()
    return int(row[0])


async def outbox_idle(service: RunService, timeout: float = 10.0) -> None:
    """Every entry delivered or given up, no delivery worker alive, no wake-up pending
    (polled: these are states of this process)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        workers = [
            t for t in asyncio.all_tasks() if t.get_name().startswith("outbox:") and not t.done()
        ]
        if (
            not workers
            and not service.store.outbox_ready.is_set()
            and undelivered(service.settings.db) == 0
        ):
            return
        assert loop.time() < deadline, f"outbox still busy after {timeout} s"
        await asyncio.sleep(0.01)


def long_notes_runbook(
    steps: int, runbook_id: str = "long-notes", trigger: str = "long drill"
) -> str:
    """A runbook of `steps` notes, whose audit summary is longer than one Telegram message."""
    lines = [
        f"id: {runbook_id}",
        "title: Many notes",
        "description: A runbook whose summary is longer than one Telegram message.",
        f"triggers: [{trigger}]",
        "steps:",
    ]
    for n in range(steps):
        lines += [
            f"  - id: note-{n}",
            f"    title: Note number {n} <with> & markup-like text",
            f"    note: {'observe the dashboard & write down what you see; ' * 3}",
        ]
    return "\n".join(lines) + "\n"


def long_action_runbook(length: int) -> str:
    """A runbook with one gated step whose exact command is `echo` and `length` x's (4500 make
    it longer than one Telegram message)."""
    return (
        "id: long-action\n"
        "title: Long action drill\n"
        "description: A gated step whose exact command is longer than one Telegram message.\n"
        "triggers: [long action drill]\n"
        "approvers: [telegram:100000001]\n"
        "steps:\n"
        "  - id: gated\n"
        "    title: A gated command\n"
        f"    run: echo {'x' * length}\n"
        "    approval: required\n"
    )
